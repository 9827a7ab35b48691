// Image: tags, n, a prompt image whose top pixel rows are kept (the model completes the rest); a grid
// of the samples the server wrote, each with the label the domain's classifier gives it.
import { base64, el, fields, fileUrl, serverLinks } from "/static/common.js";

async function body(form) {
  const out = { max_new_tokens: 4096, ...fields(form, ["tags", "n", "temperature", "seed"]) };
  const file = form.elements.prompt_image.files[0];
  if (file) {
    out.prompt_image = base64(await file.arrayBuffer());
    const rows = fields(form, ["prompt_rows"]).prompt_rows;
    if (rows !== undefined) out.options = { prompt_rows: rows };
  }
  return out;
}

function caption(sample) {
  const label = sample.label === undefined ? "" : `label ${sample.label} (${Math.round((sample.confidence || 0) * 100)}%)`;
  return `#${sample.index} ${label}`.trim();
}

function start(section, request) {
  const grid = section.querySelector(".grid");
  const links = section.querySelector(".links");
  const note = section.querySelector(".note");
  const tokens = [];
  const n = request.n || 1;
  const preview = section.querySelector(".prompt-preview");
  const file = section.querySelector("input[name=prompt_image]").files[0];
  const rows = request.options ? `its top ${request.options.prompt_rows} pixel rows kept` : "all of it kept";
  preview.replaceChildren(...(request.prompt_image && file ? [
    el("img", { src: URL.createObjectURL(file), alt: "the prompt image" }), el("figcaption", { text: `prompt: ${rows}` })] : []));
  preview.hidden = !request.prompt_image;
  grid.replaceChildren(...Array.from({ length: n }, (_, i) =>
    el("figure", { role: "listitem", "data-index": i }, el("figcaption", { text: `#${i} …` }))));
  links.replaceChildren();
  return {
    tokens(event) {
      tokens[event.sample] = (tokens[event.sample] || 0) + event.ids.length;
      const figure = grid.querySelector(`figure[data-index="${event.sample}"] figcaption`);
      if (figure) figure.textContent = `#${event.sample} ${tokens[event.sample]} patches`;
    },
    async finish(event) {
      const figures = [];
      for (const sample of event.samples) {
        const file = event.files.find((f) => f.name === `sample_${String(sample.index).padStart(3, "0")}.png`);
        const img = el("img", { alt: `image sample ${sample.index}`, src: file ? await fileUrl(file.url) : "" });
        figures.push(el("figure", { role: "listitem", "data-index": sample.index }, img, el("figcaption", { text: caption(sample) })));
      }
      grid.replaceChildren(...figures);
      links.replaceChildren(...(await serverLinks(event.files, (name) => name.endsWith(".png"))));
    },
    stopped() {
      const made = tokens.reduce((a, b) => a + (b || 0), 0);
      note.textContent = `Stopped: the server cancelled the request after ${made} patches; images are drawn when a request finishes.`;
    },
  };
}

export const image = { body, start };
