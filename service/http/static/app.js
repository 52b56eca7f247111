// The web page: lists the served models, describes the chosen one, and sends each photo once,
// to /v1/.../explain: its one JSON answer gives the bars, the out-of-distribution flag and the
// attention grid, which the page lays over the photo itself (a model without an attention
// rollout is asked /v1/.../classify instead; a model without classes /v1/.../embed, whose
// answer is shown by its size). Plain script, no build step, no requests beyond this server.
"use strict";

const TOKEN_KEY = "vit-api-token";
const TOP_K = 5;
const ROLLOUT = "attention_rollout"; // the output a model needs for explain
// The overlay as service/http/overlay.py draws explain's PNG answer: the same colours, the
// same share of the heat, the same dimming outside the box and at most the same size.
const HEAT_OPACITY = 0.6;
const UNSEEN_DIMMING = 0.45;
const OVERLAY_SIDE = 512;
const NO_PHOTO_GREY = 128; // stands in for a photo this browser cannot decode

const $ = (id) => document.getElementById(id);

let models = [];
let lastFile = null;
let upload = 0; // answers to an older upload than the latest are dropped
let needsToken = false; // the last upload was refused for its token
const objectUrls = { photo: null, overlay: null };

function showObject(img, key, blob) {
  if (objectUrls[key]) URL.revokeObjectURL(objectUrls[key]);
  objectUrls[key] = blob ? URL.createObjectURL(blob) : null;
  if (objectUrls[key]) img.src = objectUrls[key];
  else img.removeAttribute("src");
}

function authHeaders(extra = {}) {
  const token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function problem(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.type}: ${body.error}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function modelPath(model) {
  const name = encodeURIComponent(model.name);
  if (model.notLoaded) return `v1/models/${name}`; // its first request loads it
  return `v1/models/${name}/versions/${encodeURIComponent(model.version)}`;
}

const count = (n) => n.toLocaleString("en");

function percent(p) {
  return p < 0.001 ? "<0.1%" : `${(p * 100).toFixed(1)}%`;
}

function setText(id, text) {
  $(id).textContent = text;
}

const hasClasses = (model) => model.output !== "embedding";

const CARD_FIELDS = [
  "card-input-size", "card-patches", "card-tokens", "card-attention-pairs", "card-precision",
  "card-accuracy", "card-self-test", "card-ood", "card-embedding", "card-provider",
];

function renderCard(model) {
  if (model.notLoaded) {
    setText("card-labels", `not loaded (${model.notLoaded.reason})`);
    for (const id of CARD_FIELDS) setText(id, "described once loaded");
    $("card-self-test").dataset.status = "";
    return;
  }
  setText(
    "card-labels",
    hasClasses(model)
      ? `${model.labels.length}: ${model.labels.join(", ")}`
      : "none: this model serves embeddings only",
  );
  setText(
    "card-embedding",
    model.embedding
      ? `${count(model.embedding.size)} floats per image (/v1/embed): ${model.embedding.source}`
      : "none",
  );
  const size = model.input_size;
  setText("card-input-size", `${size} × ${size} pixels`);
  if (model.cost) {
    const patch = model.dataset.config.patch_size;
    const side = Math.floor(size / patch);
    const tokens = model.cost.tokens;
    setText("card-patches", `${count(side * side)} (${side} × ${side} of ${patch} × ${patch} pixels)`);
    setText("card-tokens", count(tokens));
    setText(
      "card-attention-pairs",
      `${count(model.cost.attention_pairs_per_layer)} (${count(tokens)} tokens squared)`,
    );
  } else {
    for (const id of ["card-patches", "card-tokens", "card-attention-pairs"]) {
      setText(id, "not described by the model's metadata");
    }
  }
  setText(
    "card-precision",
    model.runtime.precision ? `${model.runtime.precision}: ${model.precision_choice}` : "not reported",
  );
  setText(
    "card-accuracy",
    model.held_out_accuracy === null
      ? "not measured"
      : `${(model.held_out_accuracy * 100).toFixed(2)}% on images never seen in training`,
  );
  const selfTest = model.self_test;
  $("card-self-test").dataset.status = selfTest?.status ?? "";
  setText(
    "card-self-test",
    selfTest ? [selfTest.status, selfTest.detail].filter(Boolean).join(": ") : "not reported",
  );
  setText(
    "card-ood",
    model.ood == null
      ? "no calibration: answers carry no in/out-of-distribution flag"
      : "calibrated: each answer says whether the photo looks like the training images",
  );
  setText("card-provider", `${model.provider} (${model.engine_choice})`);
}

async function loadModels(selected = null) {
  const select = $("model");
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw new Error(await problem(response));
    const listed = await response.json();
    const idle = (listed.not_loaded ?? []).map((entry) => ({ name: entry.name, notLoaded: entry }));
    models = [...listed.models, ...idle];
  } catch (error) {
    setText("models-status", `Could not list the models: ${error.message}`);
    return;
  }
  select.replaceChildren(
    ...models.map(
      (model, index) =>
        new Option(
          model.notLoaded
            ? `${model.name} (not loaded: its first photo loads it)`
            : `${model.name} version ${model.version}`,
          index,
        ),
    ),
  );
  select.disabled = models.length === 0;
  setText("models-status", models.length ? "" : "No model is served yet.");
  const index = Math.max(0, models.findIndex((model) => model.name === selected));
  select.value = String(index);
  if (models.length) renderCard(models[index]);
}

function renderTop(top) {
  $("top-k").replaceChildren(
    ...top.map((entry) => {
      const item = document.createElement("li");
      item.dataset.label = entry.label;
      item.dataset.probability = String(entry.probability);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = entry.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      bar.style.setProperty("--share", `${entry.probability * 100}%`);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(entry.probability);
      item.append(label, bar, value);
      return item;
    }),
  );
}

function renderOod(prediction) {
  const ood = $("ood");
  const inside = prediction.in_distribution;
  ood.dataset.inDistribution = inside == null ? "unknown" : String(inside);
  const score = prediction.ood_score == null ? "" : ` (score ${prediction.ood_score.toFixed(3)})`;
  if (inside == null) {
    ood.textContent = "No in/out-of-distribution check: this model has no calibration.";
  } else if (inside) {
    ood.textContent = `In distribution${score}: the photo looks like what the model was trained on.`;
  } else {
    ood.textContent =
      `Out of distribution${score}: the photo is unlike anything the model was trained on, ` +
      "so its answer means little.";
  }
}

// Heat in [0, 1] as RGB in [0, 255], black through red and yellow to white (heat_colours in
// service/http/overlay.py).
function heatColour(heat) {
  return [3 * heat, 3 * heat - 1, 3 * heat - 2].map((c) => Math.min(Math.max(c, 0), 1) * 255);
}

const clamp = (value, low, high) => Math.min(Math.max(value, low), high);

// `grid` read at the fractional cell (x, y), between cell centres and held at the edges, as
// Pillow's bilinear resize stretches it for the server's overlay.
function bilinear(grid, x, y) {
  const rows = grid.length;
  const columns = grid[0].length;
  const x0 = Math.floor(x);
  const y0 = Math.floor(y);
  const [left, right] = [clamp(x0, 0, columns - 1), clamp(x0 + 1, 0, columns - 1)];
  const [top, bottom] = [clamp(y0, 0, rows - 1), clamp(y0 + 1, 0, rows - 1)];
  const across = x - x0;
  const down = y - y0;
  const upper = grid[top][left] * (1 - across) + grid[top][right] * across;
  const lower = grid[bottom][left] * (1 - across) + grid[bottom][right] * across;
  return upper * (1 - down) + lower * down;
}

// The box the model saw, from the original's pixels into the canvas's, at least one pixel.
function boxOnCanvas(box, imageSize, width, height) {
  const [scaleX, scaleY] = [width / imageSize[0], height / imageSize[1]];
  const left = clamp(Math.round(box[0] * scaleX), 0, width - 1);
  const top = clamp(Math.round(box[1] * scaleY), 0, height - 1);
  const right = clamp(Math.round(box[2] * scaleX), left + 1, width);
  const bottom = clamp(Math.round(box[3] * scaleY), top + 1, height);
  return [left, top, right, bottom];
}

// The grid stretched over the box as heat, its largest value the hottest; outside the box,
// the picture dimmed: it was cropped away before the model saw it.
function paintAttention(image, grid, [left, top, right, bottom]) {
  const { width, height, data } = image;
  const peak = Math.max(...grid.flat());
  const [rows, columns] = [grid.length, grid[0].length];
  for (let y = 0; y < height; y++) {
    const gridY = ((y - top + 0.5) * rows) / (bottom - top) - 0.5;
    for (let x = 0; x < width; x++) {
      const at = 4 * (y * width + x);
      if (y < top || y >= bottom || x < left || x >= right) {
        for (let c = 0; c < 3; c++) data[at + c] *= UNSEEN_DIMMING;
        continue;
      }
      const gridX = ((x - left + 0.5) * columns) / (right - left) - 0.5;
      const heat = peak > 0 ? clamp(bilinear(grid, gridX, gridY) / peak, 0, 1) : 0;
      const alpha = HEAT_OPACITY * heat;
      const colour = heatColour(heat);
      for (let c = 0; c < 3; c++) data[at + c] = data[at + c] * (1 - alpha) + colour[c] * alpha;
    }
  }
}

// The photo (grey where this browser cannot decode it) with its attention over it, as PNG.
function drawOverlay(photo, attention) {
  const [width, height] = attention.image_size;
  const scale = Math.min(1, OVERLAY_SIDE / Math.max(width, height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const context = canvas.getContext("2d");
  if (photo) {
    context.drawImage(photo, 0, 0, canvas.width, canvas.height); // upright, as EXIF says
  } else {
    context.fillStyle = `rgb(${NO_PHOTO_GREY} ${NO_PHOTO_GREY} ${NO_PHOTO_GREY})`;
    context.fillRect(0, 0, canvas.width, canvas.height);
  }
  const image = context.getImageData(0, 0, canvas.width, canvas.height);
  paintAttention(
    image,
    attention.grid,
    boxOnCanvas(attention.box, attention.image_size, canvas.width, canvas.height),
  );
  context.putImageData(image, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function showOverlay(model, file, blob) {
  const figure = $("overlay-figure");
  const overlay = $("overlay");
  overlay.alt = `Attention of ${model.name} over ${file.name}: brighter where it weighed more`;
  showObject(overlay, "overlay", blob);
  try {
    await overlay.decode();
    figure.dataset.state = "loaded";
  } catch {
    if (overlay.src !== objectUrls.overlay) return; // a later upload's overlay replaced it
    figure.dataset.state = "failed";
    setText("overlay-caption", "No attention overlay: this browser could not draw it.");
  }
}

// The upload as this browser shows it, or null where it cannot decode it (TIFF, in most
// browsers): the caption says so, and the overlay beside it is drawn on grey.
async function showPhoto(file) {
  const photo = $("photo");
  photo.hidden = false;
  photo.alt = `The photo sent: ${file.name}`;
  setText("photo-caption", "The photo");
  showObject(photo, "photo", file);
  const mine = objectUrls.photo;
  try {
    await photo.decode();
    return photo;
  } catch {
    if (mine === objectUrls.photo) {
      photo.hidden = true;
      setText(
        "photo-caption",
        `This browser cannot show ${file.name}; the attention beside it is drawn on grey.`,
      );
    }
    return null;
  }
}

// A refused upload leaves nothing of the previous answer behind, hidden or not: no bars, no
// photo, and no overlay still said to be loading.
function clearResult() {
  $("top-k").replaceChildren();
  setText("embedding-result", "");
  const ood = $("ood");
  ood.textContent = "";
  delete ood.dataset.inDistribution;
  const latency = $("latency");
  latency.textContent = "";
  delete latency.dataset.ms;
  showObject($("photo"), "photo", null);
  showObject($("overlay"), "overlay", null);
  $("overlay-figure").dataset.state = "empty";
}

// A browser sends no Authorization header of its own: after a 401 the page points at its
// token field, marked and focused, and says what to do there.
function askForToken(file) {
  const token = $("token");
  const given = token.value.trim() !== "";
  token.setAttribute("aria-invalid", "true");
  setText("token-error", given ? "The server refused this token." : "This server needs a token.");
  token.focus();
  needsToken = true;
  const why = given
    ? "the server refused the API token. Correct it"
    : "this server needs an API token. Enter it";
  return (
    `Could not classify ${file.name}: ${why} in the API token field and press Enter to send ` +
    "the photo again."
  );
}

function tokenAccepted() {
  needsToken = false;
  $("token").removeAttribute("aria-invalid");
  setText("token-error", "");
}

async function send(file) {
  const model = models[Number($("model").value)];
  if (!model) return;
  const mine = ++upload;
  lastFile = file;
  const classes = model.notLoaded !== undefined || hasClasses(model);
  // A model not loaded yet is not described yet: classified, and described once it answers.
  const explained = classes && (model.outputs ?? []).includes(ROLLOUT);
  const results = $("results");
  results.setAttribute("aria-busy", "true");
  results.dataset.state = "working";
  const doing = classes ? "Classifying" : "Embedding";
  const which = model.notLoaded ? `${model.name} (loading it first)` : `${model.name} version ${model.version}`;
  setText("status", `${doing} ${file.name} with ${which}…`);
  $("result").hidden = true;
  clearResult();
  $("overlay-figure").dataset.state = "loading";
  setText("overlay-caption", "Where the model looked: its attention over the photo, brighter where it weighed more");

  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  let status = 0;
  let answer;
  try {
    const route = explained ? "explain" : classes ? "classify" : "embed";
    const query = classes ? `?top_k=${TOP_K}` : "";
    const response = await fetch(`${modelPath(model)}/${route}${query}`, {
      method: "POST",
      headers: authHeaders({ Accept: "application/json" }),
      body: form,
    });
    status = response.status;
    answer = response.ok ? await response.json() : new Error(await problem(response));
  } catch (error) {
    answer = error;
  }
  const elapsed = performance.now() - started;
  if (mine !== upload) return;
  if (status !== 0 && status !== 401) tokenAccepted(); // past the token check, right or wrong
  if (answer instanceof Error) {
    setText(
      "status",
      status === 401
        ? askForToken(file)
        : `Could not ${classes ? "classify" : "embed"} ${file.name}: ${answer.message}`,
    );
    clearResult();
    results.dataset.state = "failed";
    results.setAttribute("aria-busy", "false");
    return;
  }

  const latency = $("latency");
  latency.dataset.ms = elapsed.toFixed(1);
  latency.textContent =
    `Answered in ${elapsed.toFixed(0)} ms, measured in this browser: ` +
    "upload, decoding, the model and the answer.";
  const prediction = classes ? answer.predictions[0] : null;
  if (classes) {
    renderTop(prediction.top);
    renderOod(prediction);
    const best = prediction.top[0];
    setText("status", `${file.name}: ${best.label}, ${percent(best.probability)}.`);
  } else {
    const size = answer.embeddings[0].embedding.length;
    setText("embedding-result", `An embedding of ${count(size)} floats: ${answer.embedding.source}.`);
    setText("status", `${file.name}: embedded (${count(size)} floats).`);
  }
  $("top-k-heading").hidden = !classes;
  $("result").hidden = false;

  const photo = await showPhoto(file);
  if (mine !== upload) return;
  if (prediction?.attention) {
    const overlay = await drawOverlay(photo, prediction.attention);
    if (mine !== upload) return;
    await showOverlay(model, file, overlay);
    if (mine !== upload) return;
  } else {
    $("overlay-figure").dataset.state = "none";
    setText(
      "overlay-caption",
      model.notLoaded
        ? `No attention overlay: ${model.name} was asked to classify while it loaded.`
        : `No attention overlay: ${model.name} version ${model.version} carries no attention rollout.`,
    );
  }
  results.dataset.state = "done";
  if (model.notLoaded) await loadModels(model.name); // loaded now: describe it
  results.setAttribute("aria-busy", "false");
}

function acceptDrops() {
  const zone = $("drop-zone");
  const area = $("upload");
  for (const kind of ["dragenter", "dragover"]) {
    area.addEventListener(kind, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const kind of ["dragleave", "drop"]) {
    area.addEventListener(kind, () => zone.classList.remove("dragging"));
  }
  area.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) send(file);
  });
  zone.addEventListener("click", () => $("file").click());
}

function start() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
  token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value));
  token.addEventListener("change", () => {
    if (needsToken && lastFile) send(lastFile); // the photo the token was missing for
  });
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) send(file);
  });
  $("model").addEventListener("change", () => {
    renderCard(models[Number($("model").value)]);
    if (lastFile) send(lastFile);
  });
  acceptDrops();
  loadModels();
}

start();
