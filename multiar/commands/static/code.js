// Code: a prompt, or prefix and suffix around a gap (fill in the middle); stop_at=block; the completion
// streams in, highlighted (a small Python tokenizer of this page: keywords, strings, comments, numbers).
import { blobLink, el, fields, serverLinks } from "/static/common.js";

const KEYWORDS = new Set(("False None True and as assert async await break class continue def del elif else except " +
  "finally for from global if import in is lambda nonlocal not or pass raise return try while with yield match case").split(" "));
const TOKEN = /(#[^\n]*)|("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?)|(\b\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?j?\b)|([A-Za-z_]\w*)/g;

function body(form) {
  const out = fields(form, ["tags", "temperature", "top_p", "max_new_tokens", "seed"]);
  const prefix = form.elements.prefix.value;
  const suffix = form.elements.suffix.value;
  if (suffix.trim()) Object.assign(out, { prompt_prefix: prefix, prompt_suffix: suffix });
  else if (prefix) out.prompt = prefix;
  if (form.elements.stop_at.checked && !out.prompt_suffix) out.stop_at = "block"; // a gap ends at EOS
  return { n: 1, ...out };
}

// Text as highlighted spans (textContent only), each of class `extra` too (context or new text).
function highlight(text, extra) {
  const out = [];
  let last = 0;
  let previous = "";
  for (const m of text.matchAll(TOKEN)) {
    if (m.index > last) out.push(el("span", { class: extra, text: text.slice(last, m.index) }));
    const [kind, word] = m[1] ? ["tok-com"] : m[2] ? ["tok-str"] : m[3] ? ["tok-num"] : ["", m[4]];
    let cls = kind;
    if (word) cls = KEYWORDS.has(word) ? "tok-kw" : previous === "def" || previous === "class" ? "tok-def" : "";
    out.push(el("span", { class: `${cls} ${extra}`.trim(), text: m[0] }));
    if (word) previous = word;
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(el("span", { class: extra, text: text.slice(last) }));
  return out;
}

function start(section, request) {
  const code = section.querySelector("pre.code code");
  const links = section.querySelector(".links");
  const before = request.prompt_prefix ?? request.prompt ?? "";
  const after = request.prompt_suffix ?? "";
  let middle = "";
  const show = () => code.replaceChildren(
    ...highlight(before, "tok-ctx"), ...highlight(middle, "tok-new"), ...highlight(after, "tok-ctx"));
  show();
  links.replaceChildren();
  return {
    tokens(event) {
      if (event.text === undefined) return;
      middle = event.text;
      show();
    },
    async finish(event) {
      const sample = event.samples[0];
      middle = sample.middle ?? sample.text.slice(before.length);
      show();
      code.parentElement.dataset.end = sample.end;
      links.replaceChildren(...(await serverLinks(event.files, (name) => name.endsWith(".py"))));
    },
    stopped() {
      links.replaceChildren(blobLink("stopped.py", before + middle + after, "text/x-python", "stopped.py (the text so far)"));
    },
  };
}

export const code = { body, start };
