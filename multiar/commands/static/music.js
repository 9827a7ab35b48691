// Music: a MIDI prompt (or none), the piano roll drawn as notes stream, sound (the server's WAV when
// it rendered one, else this page's own synth through Web Audio), and the .mid.
import { base64, blobLink, el, fields, fileUrl, serverLinks } from "/static/common.js";

const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace's name, not a fetch
const COLOURS = ["#1f5fbf", "#d2691e", "#2e8b57", "#8b1a89", "#b3261e", "#5b6470", "#a0522d", "#008b8b"];
const SECONDS_PER_BEAT = 0.5; // the synth and the page's .mid play at 120 bpm
const MAX_SYNTH_SECONDS = 180;

async function body(form) {
  const out = { n: 1, render: "wav", ...fields(form, ["prompt_bars", "tags", "temperature", "top_p", "max_new_tokens", "min_new_tokens", "seed"]) };
  const file = form.elements.prompt_midi.files[0];
  if (file) out.prompt_midi = base64(await file.arrayBuffer());
  else delete out.prompt_bars;
  return out;
}

function svgNode(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

// The whole roll from the notes: time in beats across, pitch up, a line per bar (4 beats), C lines.
function drawRoll(svg, notes) {
  const end = Math.max(16, ...notes.map((n) => n.start + n.duration));
  const low = Math.min(60, ...notes.map((n) => n.pitch)) - 2;
  const high = Math.max(72, ...notes.map((n) => n.pitch)) + 2;
  const [w, h] = [Math.max(svg.clientWidth, 400), 300]; // user units = pixels: text is not stretched
  const x = (beat) => (beat / end) * w;
  const y = (pitch) => ((high - pitch) / (high - low + 1)) * h;
  const rowHeight = h / (high - low + 1);
  const parts = [];
  for (let p = Math.ceil(low / 12) * 12; p <= high; p += 12) {
    parts.push(svgNode("line", { class: "c-line", x1: 0, x2: w, y1: y(p) + rowHeight, y2: y(p) + rowHeight }));
    const label = svgNode("text", { class: "c-label", x: 3, y: y(p) + rowHeight - 2 });
    label.textContent = `C${p / 12 - 1}`;
    parts.push(label);
  }
  for (let bar = 0; bar <= end; bar += 4) parts.push(svgNode("line", { class: "bar", x1: x(bar), x2: x(bar), y1: 0, y2: h }));
  for (const n of notes) {
    parts.push(svgNode("rect", {
      class: "note", x: x(n.start), y: y(n.pitch), width: Math.max(x(n.duration), 1.5), height: Math.max(rowHeight, 1.5),
      fill: COLOURS[n.track % COLOURS.length], "fill-opacity": 0.45 + n.velocity / 250,
    }));
  }
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren(...parts);
  svg.setAttribute("aria-label", `piano roll: ${notes.length} notes over ${Math.ceil(end / 4)} bars`);
}

// ---- this page's synth: each note a triangle wave with a short attack and release, rendered offline
function synthNote(context, n) {
  const start = n.start * SECONDS_PER_BEAT;
  const stop = start + Math.max(n.duration * SECONDS_PER_BEAT, 0.05);
  const osc = context.createOscillator();
  const gain = context.createGain();
  osc.type = "triangle";
  osc.frequency.value = 440 * 2 ** ((n.pitch - 69) / 12);
  const level = 0.12 * (n.velocity / 127);
  gain.gain.setValueAtTime(0, start);
  gain.gain.linearRampToValueAtTime(level, start + 0.01);
  gain.gain.setTargetAtTime(level * 0.6, start + 0.01, 0.2);
  gain.gain.setTargetAtTime(0, stop, 0.04);
  osc.connect(gain).connect(context.destination);
  osc.start(start);
  osc.stop(stop + 0.3);
}

function wavBytes(buffer) {
  const samples = buffer.getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, buffer.sampleRate, true); view.setUint32(28, buffer.sampleRate * 2, true);
  view.setUint16(32, 2, true); view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return view.buffer;
}

async function synthesize(notes) {
  const end = Math.max(1, ...notes.map((n) => (n.start + n.duration) * SECONDS_PER_BEAT + 0.5));
  const seconds = Math.min(end, MAX_SYNTH_SECONDS);
  const rate = 22050;
  const context = new OfflineAudioContext(1, Math.ceil(seconds * rate), rate);
  for (const n of notes.filter((m) => m.start * SECONDS_PER_BEAT < seconds)) synthNote(context, n);
  return URL.createObjectURL(new Blob([wavBytes(await context.startRendering())], { type: "audio/wav" }));
}

// ---- a .mid of notes this page holds (after Stop the server wrote none): format 0, 480 ticks/beat
function varLength(value) {
  const bytes = [value & 0x7f];
  for (let v = value >> 7; v > 0; v >>= 7) bytes.unshift((v & 0x7f) | 0x80);
  return bytes;
}

function midiBytes(notes) {
  const events = [];
  for (const n of notes) {
    const channel = n.track % 16 === 9 ? 10 : n.track % 16;
    const on = Math.round(n.start * 480);
    events.push([on, 1, [0x90 | channel, n.pitch, Math.max(1, n.velocity)]]);
    events.push([on + Math.max(1, Math.round(n.duration * 480)), 0, [0x80 | channel, n.pitch, 0]]);
  }
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const track = [0, 0xff, 0x51, 3, 0x07, 0xa1, 0x20]; // 500000 us per beat: 120 bpm
  let now = 0;
  for (const [tick, , data] of events) {
    track.push(...varLength(tick - now), ...data);
    now = tick;
  }
  track.push(0, 0xff, 0x2f, 0);
  const size = track.length;
  const head = [0x4d, 0x54, 0x68, 0x64, 0, 0, 0, 6, 0, 0, 0, 1, 0x01, 0xe0];
  const trackHead = [0x4d, 0x54, 0x72, 0x6b, (size >>> 24) & 255, (size >>> 16) & 255, (size >>> 8) & 255, size & 255];
  return new Uint8Array([...head, ...trackHead, ...track]);
}

async function sound(section, notes, files) {
  const audio = section.querySelector("audio");
  const label = section.querySelector(".sound");
  const wav = (files || []).find((f) => f.name.endsWith(".wav"));
  if (wav) {
    audio.src = await fileUrl(wav.url);
    label.textContent = "sound: the server's rendering (fluidsynth)";
  } else {
    audio.src = await synthesize(notes);
    label.textContent = "sound: this page's synth (the server rendered no WAV)";
  }
  audio.dataset.source = wav ? "server" : "page";
}

function start(section) {
  const svg = section.querySelector(".roll");
  const links = section.querySelector(".links");
  let notes = [];
  drawRoll(svg, notes);
  links.replaceChildren();
  const audio = section.querySelector("audio");
  audio.removeAttribute("src");
  delete audio.dataset.source; // set again by the next sound
  section.querySelector(".sound").textContent = "";
  return {
    tokens(event) {
      if (!event.notes || !event.notes.length) return;
      notes = notes.concat(event.notes);
      drawRoll(svg, notes);
    },
    async finish(event) {
      notes = event.samples[0].notes;
      drawRoll(svg, notes);
      const wanted = (name) => name.endsWith(".mid") || name.endsWith(".png") || name.endsWith(".wav");
      links.replaceChildren(...(await serverLinks(event.files, wanted)));
      await sound(section, notes, event.files);
    },
    async stopped() {
      links.replaceChildren(blobLink("stopped.mid", midiBytes(notes), "audio/midi", "stopped.mid (the notes so far)"));
      if (notes.length) await sound(section, notes, []);
    },
  };
}

export const music = { body, start };
