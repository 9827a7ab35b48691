// What every form shares: the API key, calls to the API, the SSE stream of /v1/generate, files as
// blob URLs (they need the key too), downloads, and small DOM helpers. Browser APIs only.

const KEY_ITEM = "multiar-api-key";
let key = sessionStorage.getItem(KEY_ITEM);

function headers(extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Ask for the key once (a dialog); resolves when one is entered.
function askKey(message) {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-error").textContent = message || "";
  return new Promise((resolve) => {
    const form = document.getElementById("key-form");
    form.onsubmit = (event) => {
      event.preventDefault();
      key = document.getElementById("key-input").value.trim();
      sessionStorage.setItem(KEY_ITEM, key);
      dialog.close();
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

// fetch with the key; a 401 asks for the key (once per wrong key) and tries again.
export async function api(path, options = {}) {
  for (let tries = 0; tries < 5; tries += 1) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status !== 401) return response;
    await askKey(key ? "That key was refused; try again." : "");
  }
  throw new Error("the server refused every key given");
}

export async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// The events of one SSE response: each `data:` line's JSON (or the string [DONE]).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut = buffer.indexOf("\n\n");
    while (cut >= 0) {
      const line = buffer.slice(0, cut).split("\n").find((l) => l.startsWith("data: "));
      buffer = buffer.slice(cut + 2);
      if (line) yield line.slice(6) === "[DONE]" ? "[DONE]" : JSON.parse(line.slice(6));
      cut = buffer.indexOf("\n\n");
    }
  }
}

// POST /v1/generate with stream=true; calls onEvent for each event until [DONE]. Aborting `signal`
// closes the stream, which cancels the request on the server (its slot is freed).
export async function generate(body, signal, onEvent) {
  const response = await api("/v1/generate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  for await (const event of sseEvents(response)) {
    if (event === "[DONE]") return;
    if (event.error) throw new Error(event.error.message);
    onEvent(event);
  }
}

// A server file (/v1/files/ID) as a blob URL: links and media cannot send the key themselves.
export async function fileUrl(url) {
  const response = await api(url);
  if (!response.ok) throw new Error(await errorText(response));
  return URL.createObjectURL(await response.blob());
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

export function downloadLink(name, href, label) {
  return el("a", { href, download: name, text: label || name });
}

export function blobLink(name, text, type, label) {
  const href = URL.createObjectURL(new Blob([text], { type }));
  return downloadLink(name, href, label);
}

// Links to the files the server wrote (fetched with the key, then offered as downloads).
export async function serverLinks(files, wanted) {
  const out = [];
  for (const file of files.filter((f) => wanted(f.name))) {
    out.push(downloadLink(file.name, await fileUrl(file.url)));
  }
  return out;
}

export function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

// The form's number fields that are filled in, as numbers; text fields that are filled in, as text.
export function fields(form, names) {
  const out = {};
  for (const name of names) {
    const input = form.elements[name];
    const value = input.value.trim();
    if (value === "") continue;
    out[name] = input.type === "number" ? Number(value) : value;
  }
  return out;
}
