// The page: pick a model, show its domain's form, run a request as a stream with Stop.
import { api, errorText, generate } from "/static/common.js";
import { music } from "/static/music.js";
import { protein } from "/static/protein.js";
import { code } from "/static/code.js";
import { image } from "/static/image.js";

const DOMAINS = { music, protein, code, image };
let models = [];

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

function current() {
  const name = document.getElementById("model").value;
  return models.find((m) => m.id === name);
}

function showModel() {
  const model = current();
  for (const section of document.querySelectorAll("section[data-domain]")) {
    section.hidden = !model || section.dataset.domain !== model.domain;
  }
  if (!model) return;
  document.getElementById("model-info").textContent = `${model.domain}` +
    (model.tags.length ? `, tags: ${model.tags.length}` : "");
  const list = document.getElementById(`${model.domain}-tags`);
  if (list) list.replaceChildren(...model.tags.map((t) => new Option(t)));
}

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new Error(await errorText(response));
  models = (await response.json()).data.map((m) => ({ tags: [], ...m }));
  const select = document.getElementById("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.domain})`, m.id)));
  const known = models.filter((m) => m.domain in DOMAINS);
  document.getElementById("no-model").hidden = known.length > 0;
  document.getElementById("no-model").textContent = "This server holds no model this page can show.";
  showModel();
}

// One request from a form: its body from the domain, the stream into the domain's view, Stop.
async function run(section, domain) {
  const form = section.querySelector("form");
  const go = form.querySelector(".go");
  const stop = form.querySelector(".stop");
  const note = section.querySelector(".note");
  const controller = new AbortController();
  let body;
  try {
    body = { ...(await domain.body(form)), model: current().id };
  } catch (err) {
    note.textContent = err.message;
    return;
  }
  const view = domain.start(section, body);
  stop.onclick = () => controller.abort();
  go.disabled = true;
  stop.disabled = false;
  section.dataset.state = "running";
  note.textContent = "Generating…";
  setStatus("generating");
  const started = performance.now();
  let finishing = null;
  try {
    await generate(body, controller.signal, (event) => {
      if (event.samples) finishing = view.finish(event);
      else view.tokens(event);
    });
    await finishing;
    note.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
    section.dataset.state = "done";
  } catch (err) {
    const stopped = controller.signal.aborted;
    note.textContent = stopped ? "Stopped: the server cancelled the request; what was made is kept." : `Error: ${err.message}`;
    section.dataset.state = stopped ? "stopped" : "error";
    if (stopped) await Promise.resolve().then(() => view.stopped()).catch((e) => { note.textContent += ` (${e.message})`; });
  } finally {
    go.disabled = false;
    stop.disabled = true;
    setStatus("");
  }
}

function bindForms() {
  for (const [name, domain] of Object.entries(DOMAINS)) {
    const section = document.getElementById(name);
    section.querySelector("form").addEventListener("submit", (event) => {
      event.preventDefault();
      run(section, domain);
    });
  }
  document.getElementById("model").addEventListener("change", showModel);
}

bindForms();
loadModels().catch((err) => {
  document.getElementById("no-model").textContent = `Could not load the models: ${err.message}`;
});
