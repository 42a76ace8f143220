// iadkit serve page: plain JavaScript, no build step, nothing fetched from another host.
//
// Images go to POST /models/{name}/predict one file per request (two requests in flight),
// so one bad file among hundreds only costs its own row. Verdicts on the page are
// re-computed here from the scores whenever the threshold slider moves, with the same
// rule as the server (anomalous when score > threshold); "Save threshold on server"
// stores the current value with PUT /models/{name}/threshold.
"use strict";

const IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"];
const IN_FLIGHT = 2;

const state = {
  models: [],
  model: null, // the selected model's description from GET /models
  limits: null,
  threshold: null, // the page's threshold (may differ from the server's until saved)
  results: [], // {index, filename, score, image, overlay, card, row}
  sort: { key: "index", dir: 1 },
  queue: [],
  active: 0,
  done: 0,
  total: 0,
  generation: 0, // bumped by Clear / model change so late answers are dropped
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function formatScore(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(4) : x.toPrecision(5);
}

function verdictOf(score) {
  if (state.threshold === null) return null;
  return score > state.threshold ? "anomalous" : "good";
}

// -- models --------------------------------------------------------------------------------
async function loadModels() {
  const [health, models] = await Promise.all([getJSON("health"), getJSON("models")]);
  state.limits = health.limits;
  state.models = models;
  const select = $("model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name)));
  selectModel(models[0].name);
}

function selectModel(name) {
  state.model = state.models.find((m) => m.name === name);
  clearResults();
  state.threshold = state.model.threshold;
  showModelInfo();
  updateSliderRange();
  rejudge();
}

function showModelInfo() {
  const m = state.model;
  const thr = m.threshold === null ? "no threshold" : `threshold ${formatScore(m.threshold)} (${m.threshold_rule})`;
  $("model-info").textContent =
    `${m.method} · input ${m.input_size[0]}×${m.input_size[1]} · ${thr} · iadkit ${m.iadkit_version}`;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { detail: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body && body.detail ? String(body.detail) : `HTTP ${response.status}`);
  return body;
}

// -- threshold -----------------------------------------------------------------------------
function updateSliderRange() {
  const values = state.results.map((r) => r.score);
  if (state.threshold !== null) values.push(state.threshold);
  if (state.model.threshold !== null) values.push(state.model.threshold);
  const slider = $("threshold");
  if (values.length === 0) return;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const span = hi > lo ? hi - lo : Math.max(Math.abs(hi), 1);
  lo -= 0.05 * span;
  hi += 0.05 * span;
  slider.min = String(lo);
  slider.max = String(hi);
  slider.step = String((hi - lo) / 1000);
  if (state.threshold !== null) slider.value = String(state.threshold);
}

function setThreshold(value, fromSlider) {
  state.threshold = value;
  if (!fromSlider && value !== null) $("threshold").value = String(value);
  rejudge();
}

function rejudge() {
  $("threshold-value").value = state.threshold === null ? "" : String(state.threshold);
  let flagged = 0;
  for (const r of state.results) {
    const v = verdictOf(r.score);
    if (v === "anomalous") flagged += 1;
    const text = v === null ? "no threshold" : v;
    for (const node of [r.card.querySelector(".verdict"), r.row.querySelector(".verdict")]) {
      node.textContent = text;
      node.className = `verdict ${v || ""}`;
    }
    r.card.className = `card ${v || ""}`;
  }
  const n = state.results.length;
  const unsaved =
    state.threshold !== null && state.model && state.threshold !== state.model.threshold ? " (not saved on the server)" : "";
  $("summary").textContent =
    n === 0 ? "" : state.threshold === null ? `${n} images scored; set a threshold to judge them` : `${flagged} of ${n} images flagged anomalous${unsaved}`;
  if (state.sort.key === "verdict") applySort();
}

async function saveThreshold() {
  const status = $("threshold-status");
  if (state.threshold === null) {
    status.textContent = "move the slider first";
    return;
  }
  status.textContent = "saving…";
  try {
    const described = await getJSON(`models/${encodeURIComponent(state.model.name)}/threshold`, {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ value: state.threshold }),
    });
    Object.assign(state.model, described);
    showModelInfo();
    status.textContent = `saved: ${formatScore(described.threshold)}`;
    rejudge();
  } catch (err) {
    status.textContent = `not saved: ${err.message}`;
  }
}

// -- uploads -------------------------------------------------------------------------------
function looksLikeImage(file) {
  const name = file.name.toLowerCase();
  return file.type.startsWith("image/") || IMAGE_SUFFIXES.some((s) => name.endsWith(s));
}

function addFiles(files, { fromFolder = false } = {}) {
  let skipped = 0;
  for (const file of files) {
    const name = file.webkitRelativePath || file.relativePath || file.name;
    if (fromFolder && !looksLikeImage(file)) {
      skipped += 1;
      continue;
    }
    if (state.limits && file.size > state.limits.max_file_bytes) {
      showError(`${name}: ${(file.size / 1048576).toFixed(1)} MB is over the server's per-file limit`);
      continue;
    }
    state.queue.push({ file, name, generation: state.generation });
    state.total += 1;
  }
  if (skipped) showError(`${skipped} file(s) in the folder are not images and were skipped`);
  showProgress();
  pump();
}

function pump() {
  while (state.active < IN_FLIGHT && state.queue.length) {
    const job = state.queue.shift();
    state.active += 1;
    send(job).finally(() => {
      state.active -= 1;
      if (job.generation === state.generation) state.done += 1;
      showProgress();
      pump();
    });
  }
}

async function send(job) {
  const form = new FormData();
  form.append("files", job.file, job.name);
  try {
    const body = await getJSON(`models/${encodeURIComponent(state.model.name)}/predict`, { method: "POST", body: form });
    if (job.generation !== state.generation) return;
    for (const r of body.results) {
      if (r.error) showError(`${r.filename}: ${r.error}`); // no score, no verdict: never shown as good
      else addResult(r);
    }
  } catch (err) {
    if (job.generation === state.generation) showError(err.message.startsWith(job.name) ? err.message : `${job.name}: ${err.message}`);
  }
}

function showProgress() {
  const p = $("progress");
  if (state.total === 0) p.textContent = "";
  else if (state.done < state.total) p.textContent = `scoring… ${state.done} / ${state.total}`;
  else p.textContent = `${state.total} file(s) processed`;
}

function showError(message) {
  $("errors").append(el("li", {}, message));
}

// -- results -------------------------------------------------------------------------------
function addResult(r) {
  const index = state.results.length + 1;
  const card = el("article", { class: "card", "data-index": String(index), "data-score": String(r.score) });
  card.append(el("h3", {}, r.filename));
  const stack = el("div", { class: "stack" });
  const [h, w] = state.model.input_size;
  stack.style.setProperty("--aspect", String(w / h));
  const base = el("img", { class: "base", alt: `${r.filename} as the model saw it`, src: r.image });
  const over = el("img", { class: "overlay", alt: `${r.filename} heat map`, src: r.overlay });
  stack.append(base, over);
  card.append(stack);
  const meta = el("div", { class: "meta" });
  meta.append(el("span", { class: "score" }, `score ${formatScore(r.score)}`), el("span", { class: "verdict" }));
  card.append(meta);
  const opacityLabel = el("label", { class: "opacity" }, "heat map");
  const opacity = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: "1", "aria-label": `heat map opacity for ${r.filename}` });
  opacity.addEventListener("input", () => {
    over.style.opacity = opacity.value;
  });
  opacityLabel.append(opacity);
  card.append(opacityLabel);

  const row = el("tr", { "data-index": String(index), "data-score": String(r.score) });
  row.append(
    el("td", { class: "num" }, String(index)),
    el("td", {}, r.filename),
    el("td", { class: "num score" }, formatScore(r.score)),
    el("td", { class: "verdict" }),
  );
  row.addEventListener("click", () => card.scrollIntoView({ behavior: "smooth", block: "center" }));

  state.results.push({ index, filename: r.filename, score: r.score, card, row });
  $("gallery").append(card);
  $("results-table").tBodies[0].append(row);
  $("table-section").hidden = false;
  updateSliderRange();
  rejudge();
  applySort();
}

function sortValue(r, key) {
  if (key === "verdict") return verdictOf(r.score) === "anomalous" ? 1 : 0;
  return r[key];
}

function applySort() {
  const { key, dir } = state.sort;
  const sorted = [...state.results].sort((a, b) => {
    const x = sortValue(a, key);
    const y = sortValue(b, key);
    const c = typeof x === "string" ? x.localeCompare(y, undefined, { numeric: true }) : x - y;
    return c !== 0 ? dir * c : a.index - b.index;
  });
  const body = $("results-table").tBodies[0];
  const gallery = $("gallery");
  for (const r of sorted) {
    body.append(r.row); // append moves the existing node: images are not reloaded
    gallery.append(r.card);
  }
  for (const th of document.querySelectorAll("#results-table th")) {
    th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
}

function clearResults() {
  state.generation += 1;
  state.results = [];
  state.queue = [];
  state.done = 0;
  state.total = 0;
  $("gallery").replaceChildren();
  $("results-table").tBodies[0].replaceChildren();
  $("errors").replaceChildren();
  $("table-section").hidden = true;
  $("summary").textContent = "";
  showProgress();
}

// -- CSV -----------------------------------------------------------------------------------
function csvCell(value) {
  let s = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(s) && typeof value === "string") s = `'${s}`; // no formulas when opened in a spreadsheet
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  const lines = [["filename", "score", "threshold", "verdict", "model"].join(",")];
  for (const r of [...state.results].sort((a, b) => a.index - b.index)) {
    lines.push([csvCell(r.filename), r.score, state.threshold === null ? "" : state.threshold, verdictOf(r.score) || "", csvCell(state.model.name)].join(","));
  }
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  const link = el("a", { href: URL.createObjectURL(blob), download: `iadkit-${state.model.name}-results.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// -- drag and drop (folders included) ---------------------------------------------------------
async function filesFromEntry(entry, prefix) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    return [{ file, path: prefix + file.name }];
  }
  const reader = entry.createReader();
  const out = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    for (const child of batch) out.push(...(await filesFromEntry(child, `${prefix}${entry.name}/`)));
  }
  return out;
}

async function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const items = [...(event.dataTransfer.items || [])];
  const entries = items.map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null)).filter(Boolean);
  if (entries.length && entries.some((e) => e.isDirectory)) {
    const found = [];
    for (const entry of entries) found.push(...(await filesFromEntry(entry, "")));
    addFiles(found.map(({ file, path }) => Object.assign(file, { relativePath: path })), { fromFolder: true });
  } else {
    addFiles(event.dataTransfer.files);
  }
}

// -- wiring ----------------------------------------------------------------------------------
function init() {
  $("model").addEventListener("change", (e) => selectModel(e.target.value));
  $("threshold").addEventListener("input", (e) => setThreshold(Number(e.target.value), true));
  $("threshold-value").addEventListener("change", (e) => {
    const v = Number(e.target.value);
    if (e.target.value !== "" && Number.isFinite(v)) setThreshold(v, false);
  });
  $("save-threshold").addEventListener("click", saveThreshold);
  $("files").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  $("folder").addEventListener("change", (e) => {
    addFiles(e.target.files, { fromFolder: true });
    e.target.value = "";
  });
  $("download-csv").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", () => {
    clearResults();
    rejudge();
  });
  for (const th of document.querySelectorAll("#results-table th")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : key === "score" ? -1 : 1 };
      applySort();
    });
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  loadModels().catch((err) => showError(`cannot reach the server: ${err.message}`));
}

document.addEventListener("DOMContentLoaded", init);
