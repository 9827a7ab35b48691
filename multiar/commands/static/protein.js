// Protein: tags, a length window, a template with fixed positions, n samples; a table of samples with
// ppl, identity and passes, residues coloured by property; the server's FASTA and CSV.
import { blobLink, el, fields, serverLinks } from "/static/common.js";

const GROUPS = { h: "AVLIMC", a: "FWY", p: "KRH", n: "DE", o: "STNQ", s: "GP" };
const GROUP_OF = Object.fromEntries(Object.entries(GROUPS).flatMap(([g, letters]) => [...letters].map((c) => [c, g])));

function body(form) {
  const out = fields(form, ["tags", "prompt", "min_len", "max_len", "template", "fixed", "n", "temperature", "top_p", "max_new_tokens", "seed"]);
  if (out.prompt) out.prompt = out.prompt.toUpperCase();
  if (out.template) out.template = out.template.toUpperCase();
  return out;
}

// A sequence as spans of one colour group each (textContent only: nothing is parsed as HTML).
function residues(text) {
  const cell = el("td", { class: "seq" });
  let i = 0;
  while (i < text.length) {
    const group = GROUP_OF[text[i]] || "s";
    let j = i + 1;
    while (j < text.length && (GROUP_OF[text[j]] || "s") === group) j += 1;
    cell.append(el("span", { class: `aa-${group}`, text: text.slice(i, j) }));
    i = j;
  }
  return cell;
}

const number = (v, digits) => (typeof v === "number" ? v.toFixed(digits) : v === undefined ? "–" : String(v));

function row(index, sample) {
  const text = sample.text || "";
  const passes = sample.passes === undefined ? "–" : sample.passes ? "yes" : "no";
  return el("tr", { "data-index": index },
    el("td", { text: String(index) }),
    el("td", { text: String(text.length) }),
    el("td", { text: sample.end || "…" }),
    el("td", { text: number(sample.ppl, 2) }),
    el("td", { text: typeof sample.identity === "number" ? `${(sample.identity * 100).toFixed(0)}%` : "–" }),
    el("td", { text: passes }),
    residues(text));
}

function fasta(texts) {
  return texts.map((t, i) => `>sample_${i} stopped\n${t}\n`).join("");
}

function start(section, request) {
  const head = request.prompt || "";
  const tbody = section.querySelector("tbody");
  const links = section.querySelector(".links");
  const texts = [];
  tbody.replaceChildren();
  links.replaceChildren();
  const show = (i, sample) => {
    const next = row(i, sample);
    const old = tbody.querySelector(`tr[data-index="${i}"]`);
    if (old) old.replaceWith(next);
    else tbody.append(next);
  };
  return {
    tokens(event) {
      if (event.text === undefined) return;
      texts[event.sample] = head + event.text;
      show(event.sample, { text: texts[event.sample] });
    },
    async finish(event) {
      event.samples.forEach((s) => show(s.index, s));
      const wanted = (name) => name.endsWith(".fasta") || name.endsWith(".csv");
      links.replaceChildren(...(await serverLinks(event.files, wanted)));
    },
    stopped() {
      const kept = texts.filter((t) => t !== undefined);
      links.replaceChildren(blobLink("stopped.fasta", fasta(kept), "text/plain", "stopped.fasta (the residues so far)"));
    },
  };
}

export const protein = { body, start };
