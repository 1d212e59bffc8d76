// dgemma playground: the same prompt decoded by block diffusion and by AR at once, through the server's own
// OpenAI-compatible streaming API (POST /v1/completions, stream_options.include_drafts for the dgemma_draft
// chunks); and replays of files from `dgemma generate --record` (format: dgemma/trajectory.py). No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const TRAJECTORY_FORMAT = "dgemma-trajectory";
const TRAJECTORY_VERSION = 1;

let vocab = null; // token id -> its text (GET /playground/vocab.json), for drawing draft canvases token by token
let modelId = null;
let running = null; // {controller, panes} while a race or a replay runs
let sudoku = null; // {n, boxRows, boxCols} when the served model solves Sudoku (detected from its vocabulary)
const SUDOKU_EXAMPLE = { 6: "...2343....1..35.26...4.1.53........" }; // a held-out puzzle of the shipped 6x6 model
const KEY_STORE = "dgemma-api-key"; // the server's API key (`dgemma serve --api-key`), kept in this browser only

// The key field's value (or `?key=` in the address, read once, stored and removed from the address).
function apiHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function initKey() {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("key");
  if (given !== null) {
    localStorage.setItem(KEY_STORE, given);
    url.searchParams.delete("key");
    window.history.replaceState(null, "", url.toString());
  }
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
}

// ---- one pane: its state, figures and text ------------------------------------------------------------------

class Pane {
  constructor(kind) {
    this.kind = kind; // "diffusion" | "ar"
    this.el = $(`pane-${kind}`);
    this.out = $(`${kind}-out`);
    this.reset();
  }

  reset() {
    this.t0 = performance.now();
    this.elapsed = 0;
    this.denoise = 0; // denoising (decoder) passes: one per dgemma_draft
    this.encode = 0; // encoder passes: the prompt, then one commit per canvas (diffusion); one per token (AR)
    this.tokens = 0;
    this.canvasIndex = -1;
    this.committed = "";
    this.draft = null; // the last dgemma_draft of the open canvas
    this.held = []; // per canvas position: accepted at an earlier step of the open canvas
    this.done = false;
    this.solved = null;
    if (sudoku) $(`${this.kind}-solved`).textContent = "–";
    this.replaying = false; // a trajectory replay sets the clock from the file
    this.setState("idle");
    this.status("waiting");
    this.render();
    this.figures();
  }

  setState(state) {
    this.el.dataset.state = state;
  }

  status(text) {
    $(`${this.kind}-status`).textContent = text;
  }

  get passes() {
    return this.denoise + this.encode;
  }

  figures() {
    const started = this.el.dataset.state !== "idle";
    const secs = this.elapsed / 1000;
    const passes = this.passes;
    $(`${this.kind}-passes`).textContent = started ? String(passes) : "–";
    $(`${this.kind}-tpf`).textContent = started && passes ? (this.tokens / passes).toFixed(2) : "–";
    $(`${this.kind}-tps`).textContent = started && secs > 0 ? (this.tokens / secs).toFixed(1) : "–";
    $(`${this.kind}-elapsed`).textContent = started ? `${secs.toFixed(2)} s` : "–";
    if (started && this.kind === "diffusion") {
      $("diffusion-passes").title = `${this.denoise} denoising + ${this.encode} encoder passes`;
    }
  }

  tick() {
    if (!this.done && !this.replaying && this.el.dataset.state === "running") {
      this.elapsed = performance.now() - this.t0;
      this.figures();
    }
  }

  render() {
    if (sudoku) {
      this.out.replaceChildren(sudokuGrid(this));
      return;
    }
    const frag = document.createDocumentFragment();
    const solid = document.createElement("span");
    solid.className = "committed";
    solid.textContent = this.committed;
    frag.appendChild(solid);
    if (this.draft && !this.done) {
      const d = this.draft;
      for (let i = 0; i < d.ids.length; i++) {
        const span = document.createElement("span");
        span.className = d.accepted[i] ? "tok acc" : this.held[i] ? "tok held" : "tok draft";
        // line breaks of a draft are drawn as ↵ so that a canvas stays one compact block until it is committed
        span.textContent = piece(d.ids[i], d.pieces, i).replace(/\r?\n/g, "↵");
        if (d.entropy) span.title = `entropy ${d.entropy[i].toFixed(3)} nats`;
        frag.appendChild(span);
      }
    } else if (!this.done && this.el.dataset.state === "running") {
      const cursor = document.createElement("span");
      cursor.className = "cursor";
      frag.appendChild(cursor);
    }
    this.out.replaceChildren(frag);
    this.out.scrollTop = this.out.scrollHeight;
  }

  // a dgemma_draft: one denoising step of the open canvas
  onDraft(d) {
    if (d.canvas_index !== this.canvasIndex) {
      this.canvasIndex = d.canvas_index;
      this.encode += 1; // each canvas follows an encoder pass: the prompt's, or the previous canvas's commit
      this.held = [];
    }
    this.denoise += 1;
    this.draft = d;
    this.status(`canvas ${d.canvas_index + 1}, step ${d.step}: ${d.accepted.filter(Boolean).length}/` +
      `${d.accepted.length} accepted` + (d.mean_entropy == null ? "" : `, mean entropy ${d.mean_entropy.toFixed(3)}`));
    this.render();
    d.accepted.forEach((a, i) => { if (a) this.held[i] = true; });
  }

  // committed text (a finished canvas, or AR tokens)
  onText(text, maxTokens) {
    this.committed += text;
    if (this.kind === "ar") {
      this.encode += 1; // one forward per token (the first also reads the prompt)
      this.tokens += 1;
      this.status(`${this.tokens} tokens`);
    } else if (this.draft) {
      this.tokens = Math.min(this.draft.offset + this.draft.ids.length, maxTokens || Infinity);
      this.draft = null;
    }
    this.render();
  }

  finish(reason, usage) {
    if (usage) {
      this.tokens = usage.completion_tokens;
      if (this.kind === "ar") this.encode = Math.max(this.tokens, 1);
    }
    this.elapsed = performance.now() - this.t0;
    this.done = true;
    this.draft = null;
    this.setState("done");
    const canvases = this.kind === "diffusion" ? `, ${Math.max(this.canvasIndex + 1, 0)} canvases` : "";
    this.status(`finished (${reason || "done"}): ${this.tokens} tokens${canvases}`);
    if (sudoku) {
      this.solved = sudokuSolved(cellsOf(this.committed), puzzleCells($("prompt").value));
      $(`${this.kind}-solved`).textContent = this.solved ? "yes" : "no";
    }
    this.render();
    this.figures();
  }

  fail(message) {
    this.done = true;
    this.setState("error");
    this.status(`error: ${message}`);
    this.render();
  }
}

function piece(id, pieces, i) {
  if (pieces) return pieces[i];
  if (vocab && id >= 0 && id < vocab.length) return vocab[id];
  return `‹${id}›`;
}

// ---- Sudoku: the same race drawn as two grids --------------------------------------------------------------------

// A Sudoku model's vocabulary is its special tokens, the digits and "."; its canvas is the n x n cells plus EOS.
function sudokuShape(pieces, canvasLength) {
  const plain = pieces.filter((p) => p !== "" && !/^<[^<>]*>$/.test(p)); // specials decode to "" or <name>
  if (!plain.length || plain.length > 11 || !plain.every((p) => /^[0-9.]$/.test(p))) return null;
  const n = Math.round(Math.sqrt(canvasLength - 1));
  if (n * n !== canvasLength - 1 || n < 4 || n > 9) return null;
  let boxRows = Math.floor(Math.sqrt(n));
  while (n % boxRows) boxRows -= 1;
  return { n, boxRows, boxCols: n / boxRows };
}

// The puzzle typed in the prompt: n*n cells, a digit for a given and null for a blank ("." or "0").
function puzzleCells(text) {
  const chars = [...text].filter((c) => /[0-9.]/.test(c));
  return Array.from({ length: sudoku.n * sudoku.n }, (_, i) => (chars[i] && /[1-9]/.test(chars[i]) ? chars[i] : null));
}

// The digits of committed text, one per cell, in row-major order.
function cellsOf(text) {
  return [...text].filter((c) => !/\s/.test(c)).slice(0, sudoku.n * sudoku.n);
}

function sudokuSolved(cells, givens) {
  const { n, boxRows, boxCols } = sudoku;
  if (cells.length !== n * n || cells.some((c, i) => givens[i] !== null && c !== givens[i])) return false;
  const want = Array.from({ length: n }, (_, i) => String(i + 1)).join("");
  const ok = (idx) => idx.map((i) => cells[i]).sort().join("") === want;
  for (let k = 0; k < n; k++) {
    const row = [], col = [], box = [];
    const r0 = Math.floor(k / (n / boxCols)) * boxRows, c0 = (k % (n / boxCols)) * boxCols;
    for (let j = 0; j < n; j++) {
      row.push(k * n + j);
      col.push(j * n + k);
      box.push((r0 + Math.floor(j / boxCols)) * n + c0 + (j % boxCols));
    }
    if (!ok(row) || !ok(col) || !ok(box)) return false;
  }
  return true;
}

// The grid of one pane: givens bold, committed digits solid, and for diffusion the open canvas's draft digits
// (accepted this step highlighted, accepted earlier in this canvas shaded, the rest muted).
function sudokuGrid(pane) {
  const { n, boxRows, boxCols } = sudoku;
  const givens = puzzleCells($("prompt").value);
  const cells = Array.from({ length: n * n }, (_, i) => (givens[i] ? { text: givens[i], cls: "given" } : null));
  cellsOf(pane.committed).forEach((c, i) => {
    cells[i] = { text: c, cls: givens[i] ? (c === givens[i] ? "given" : "wrong") : "committed" };
  });
  if (pane.draft && !pane.done) {
    const d = pane.draft;
    d.ids.forEach((id, j) => {
      const i = d.offset + j;
      if (i >= n * n || givens[i]) return; // past the grid (EOS), or a given (drawn as the given)
      const cls = d.accepted[j] ? "tok acc" : pane.held[j] ? "tok held" : "tok draft";
      cells[i] = { text: piece(id, d.pieces, j).trim() || "·", cls };
    });
  }
  const grid = document.createElement("div");
  grid.className = "grid";
  grid.style.gridTemplateColumns = `repeat(${n}, 2.2em)`;
  cells.forEach((cell, i) => {
    const el = document.createElement("span");
    const r = Math.floor(i / n), c = i % n;
    el.className = "cell" + (cell ? ` ${cell.cls}` : " blank") + (c % boxCols === boxCols - 1 && c < n - 1 ? " box-r" : "") +
      (r % boxRows === boxRows - 1 && r < n - 1 ? " box-b" : "");
    el.textContent = cell ? cell.text : "";
    grid.appendChild(el);
  });
  return grid;
}

const panes = { diffusion: new Pane("diffusion"), ar: new Pane("ar") };

function message(text, info = false) {
  const el = $("message");
  el.textContent = text;
  el.className = info ? "info" : "";
}

// ---- the server's streaming API -------------------------------------------------------------------------------

// POST body -> calls onChunk(obj) for every SSE chunk until [DONE]; throws with the server's error message.
async function streamCompletion(body, onChunk, signal) {
  const res = await fetch("/v1/completions", {
    method: "POST",
    headers: apiHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try {
      text = (await res.json()).error.message;
    } catch (_) { /* not an OpenAI error body */ }
    throw new Error(text);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onChunk(obj);
      }
    }
  }
  throw new Error("the stream ended before [DONE]");
}

function requestBody(kind) {
  const num = (id) => {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  };
  const body = {
    prompt: $("prompt").value,
    stream: true,
    stream_options: { include_usage: true, include_drafts: kind === "diffusion" },
    mode: kind,
    max_tokens: num("max-tokens"),
    seed: num("seed"),
  };
  if (modelId) body.model = modelId;
  if (kind === "diffusion") {
    if (num("steps") !== null) body.denoising_steps = num("steps");
    if (num("entropy-bound") !== null) body.entropy_bound = num("entropy-bound");
  }
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  return body;
}

async function runPane(pane, signal) {
  const body = requestBody(pane.kind);
  pane.reset();
  pane.setState("running");
  pane.status("sent");
  pane.render();
  let reason = null;
  let usage = null;
  try {
    await streamCompletion(body, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.dgemma_draft) pane.onDraft(choice.dgemma_draft);
        else if (choice.text) pane.onText(choice.text, body.max_tokens);
        if (choice.finish_reason) reason = choice.finish_reason;
      }
      pane.tick();
    }, signal);
    pane.finish(reason, usage);
  } catch (err) {
    if (err.name === "AbortError") {
      pane.fail("stopped");
    } else {
      pane.fail(err.message);
      throw err;
    }
  }
}

async function loadVocab() {
  if (vocab) return;
  const res = await fetch("/playground/vocab.json", { headers: apiHeaders() });
  if (!res.ok) throw new Error(`the vocabulary could not be loaded (${res.status})`);
  vocab = await res.json();
}

// ---- race --------------------------------------------------------------------------------------------------------

function showPanes(mode) {
  panes.diffusion.el.hidden = mode === "ar";
  panes.ar.el.hidden = mode === "diffusion";
}

async function race() {
  if (running) return;
  if (!$("prompt").value) {
    message("type a prompt first");
    return;
  }
  const mode = $("mode").value;
  const kinds = mode === "race" ? ["diffusion", "ar"] : [mode];
  showPanes(mode);
  const controller = new AbortController();
  running = { controller };
  setBusy(true);
  message("");
  try {
    await loadVocab();
    const results = await Promise.allSettled(kinds.map((k) => runPane(panes[k], controller.signal)));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) message(failed.reason.message);
    else if (kinds.length === 2) {
      const d = panes.diffusion, a = panes.ar;
      const verdict = (p) => (sudoku ? (p.solved ? ", solved" : ", not solved") : "");
      message(`diffusion: ${d.passes} forward passes for ${d.tokens} tokens${verdict(d)}; AR: ${a.passes} for ` +
        `${a.tokens}${verdict(a)} (${(a.passes / Math.max(d.passes, 1)).toFixed(1)}× more passes)`, true);
    }
  } catch (err) {
    message(err.message);
  } finally {
    running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- trajectories ------------------------------------------------------------------------------------------------

// Parse and check a trajectory (JSONL text); errors name the line, as `dgemma replay` does.
function parseTrajectory(text, name) {
  const lines = text.split(/\r?\n/);
  while (lines.length && lines[lines.length - 1] === "") lines.pop();
  if (!lines.length) throw new Error(`${name} is empty`);
  const traj = { header: null, events: [], end: null };
  lines.forEach((line, i) => {
    const where = `${name} line ${i + 1}`;
    let obj;
    try {
      obj = JSON.parse(line);
    } catch (_) {
      throw new Error(`${where} is not JSON${i === lines.length - 1 ? " (the file looks cut short)" : ""}`);
    }
    if (!obj || typeof obj !== "object" || !["header", "step", "commit", "end"].includes(obj.type)) {
      throw new Error(`${where} is not a trajectory record; is ${name} a \`dgemma generate --record\` file?`);
    }
    if (i === 0) {
      if (obj.type !== "header" || obj.format !== TRAJECTORY_FORMAT) {
        throw new Error(`${where} is not a dgemma trajectory header (format "${TRAJECTORY_FORMAT}")`);
      }
      if (!Number.isInteger(obj.version) || obj.version > TRAJECTORY_VERSION) {
        throw new Error(`${where}: trajectory version ${obj.version} is newer than this page reads`);
      }
      traj.header = obj;
    } else if (obj.type === "header") {
      throw new Error(`${where}: a second header`);
    } else if (traj.end) {
      throw new Error(`${where}: a ${obj.type} record after the end record`);
    } else if (obj.type === "end") {
      traj.end = obj;
    } else {
      if (obj.type === "step" && (!Array.isArray(obj.ids) || obj.ids.length !== traj.header.canvas_length)) {
        throw new Error(`${where}: a step needs ${traj.header.canvas_length} ids`);
      }
      traj.events.push(obj);
    }
  });
  if (!traj.end) {
    throw new Error(`${name} ends at line ${lines.length} without its end record: the recording was cut short`);
  }
  return traj;
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => {
    clearTimeout(timer);
    reject(new DOMException("stopped", "AbortError"));
  }, { once: true });
});

async function replayTrajectory(traj, name) {
  if (running) return;
  const kind = traj.header.mode === "ar" ? "ar" : "diffusion";
  showPanes(kind);
  const pane = panes[kind];
  const pieces = traj.end.pieces || {};
  const text = (ids) => ids.map((i) => pieces[String(i)] ?? `‹${i}›`).join("");
  const speed = Number($("speed").value) || 1;
  const controller = new AbortController();
  running = { controller };
  setBusy(true);
  pane.reset();
  pane.replaying = true;
  pane.setState("running");
  if (traj.header.prompt != null) $("prompt").value = traj.header.prompt;
  message(`replaying ${name}: ${traj.header.model}, ${traj.end.tokens} tokens`, true);
  let clock = 0;
  try {
    for (const e of traj.events) {
      const t = e.t ?? clock;
      await sleep(Math.min(Math.max(t - clock, 0), 1) * 1000 / speed, controller.signal);
      clock = t;
      pane.elapsed = t * 1000;
      if (e.type === "step") {
        pane.onDraft({ ...e, canvas_index: e.canvas, pieces: e.ids.map((i) => pieces[String(i)] ?? `‹${i}›`),
          accepted: e.accepted.map(Boolean) });
      } else {
        if (kind === "ar") {
          pane.onText(text(e.ids));
        } else {
          pane.committed += text(e.ids);
          pane.tokens = e.offset + e.ids.length;
          pane.draft = null;
          pane.render();
        }
      }
      pane.figures();
    }
    pane.finish(traj.end.finish_reason, { completion_tokens: traj.end.tokens });
    pane.elapsed = (traj.end.seconds ?? clock) * 1000;
    pane.figures();
  } catch (err) {
    pane.fail(err.name === "AbortError" ? "stopped" : err.message);
  } finally {
    running = null;
    setBusy(false);
  }
}

async function onFile(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    const traj = parseTrajectory(await file.text(), file.name);
    await replayTrajectory(traj, file.name);
  } catch (err) {
    message(err.message);
  }
}

// ---- wiring --------------------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: apiHeaders() });
    if (res.status === 401) {
      message("this server needs an API key: enter it in the key field");
      return;
    }
    const card = (await res.json()).data[0];
    modelId = card.id;
    $("model-name").textContent = card.id;
    $("model-info").textContent = `canvas ${card.canvas_length} tokens, context ${card.max_model_len}`;
    await loadVocab();
    sudoku = sudokuShape(vocab, card.canvas_length);
    document.body.classList.toggle("sudoku", sudoku !== null);
    if (sudoku) {
      const { n } = sudoku;
      $("model-info").textContent += ` · Sudoku ${n}x${n}: the prompt is the puzzle row by row, "." for a blank`;
      if ($("prompt").value === $("prompt").defaultValue) $("prompt").value = SUDOKU_EXAMPLE[n] || ".".repeat(n * n);
      $("max-tokens").value = String(n * n);
      for (const p of Object.values(panes)) p.reset();
    }
  } catch (err) {
    message(`the server did not answer /v1/models (${err.message})`);
  }
}

function init() {
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    race();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      race();
    }
  });
  $("stop").addEventListener("click", () => running && running.controller.abort());
  $("trajectory").addEventListener("change", onFile);
  $("mode").addEventListener("change", () => showPanes($("mode").value));
  setInterval(() => {
    for (const p of Object.values(panes)) p.tick();
  }, 100);
  initKey();
  loadModel();
}

init();
