// The web page: lists the served models, describes the chosen one, and sends a photo to
// /v1/.../classify (the answer, its bars and the round trip) and /v1/.../explain (the attention
// overlay, drawn by the server). Plain script, no build step, no requests beyond this server.
"use strict";

const TOKEN_KEY = "vit-api-token";
const TOP_K = 5;

const $ = (id) => document.getElementById(id);

let models = [];
let lastFile = null;
let upload = 0; // answers to an older upload than the latest are dropped
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
  return `v1/models/${name}/versions/${encodeURIComponent(model.version)}`;
}

const count = (n) => n.toLocaleString("en");

function percent(p) {
  return p < 0.001 ? "<0.1%" : `${(p * 100).toFixed(1)}%`;
}

function setText(id, text) {
  $(id).textContent = text;
}

function renderCard(model) {
  setText("card-labels", `${model.labels.length}: ${model.labels.join(", ")}`);
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
  setText("card-precision", model.runtime.precision ?? "not reported");
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
  setText("card-provider", model.provider);
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw new Error(await problem(response));
    models = (await response.json()).models;
  } catch (error) {
    setText("models-status", `Could not list the models: ${error.message}`);
    return;
  }
  select.replaceChildren(
    ...models.map((model, index) => new Option(`${model.name} version ${model.version}`, index)),
  );
  select.disabled = models.length === 0;
  setText("models-status", models.length ? "" : "No model is served yet.");
  if (models.length) renderCard(models[0]);
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

async function showOverlay(model, file, mine) {
  const figure = $("overlay-figure");
  const overlay = $("overlay");
  const form = new FormData();
  form.append("file", file, file.name);
  let outcome;
  try {
    const response = await fetch(`${modelPath(model)}/explain`, {
      method: "POST",
      headers: authHeaders({ Accept: "image/png" }),
      body: form,
    });
    outcome = response.ok ? await response.blob() : new Error(await problem(response));
  } catch (error) {
    outcome = error;
  }
  if (mine !== upload) return;
  if (outcome instanceof Error) {
    figure.dataset.state = "failed";
    setText("overlay-caption", `No attention overlay: ${outcome.message}`);
    return;
  }
  overlay.alt = `Attention of ${model.name} over ${file.name}: brighter where it weighed more`;
  overlay.addEventListener("load", () => (figure.dataset.state = "loaded"), { once: true });
  showObject(overlay, "overlay", outcome);
}

// The upload as this browser shows it; a format it cannot show (TIFF, in most browsers) is
// said, and the overlay beside it is the photo as the server decoded it.
function showPhoto(file) {
  const photo = $("photo");
  photo.hidden = false;
  photo.alt = `The photo sent: ${file.name}`;
  setText("photo-caption", "The photo");
  photo.addEventListener(
    "error",
    () => {
      if (photo.src !== objectUrls.photo) return; // a later upload's photo replaced it
      photo.hidden = true;
      setText(
        "photo-caption",
        `This browser cannot show ${file.name}; the overlay beside it is the photo as the server decoded it.`,
      );
    },
    { once: true },
  );
  showObject(photo, "photo", file);
}

// A refused upload leaves nothing of the previous answer behind, hidden or not: no bars, no
// photo, and no overlay still said to be loading.
function clearResult() {
  $("top-k").replaceChildren();
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

async function classify(file) {
  const model = models[Number($("model").value)];
  if (!model) return;
  const mine = ++upload;
  lastFile = file;
  const results = $("results");
  results.setAttribute("aria-busy", "true");
  results.dataset.state = "working";
  setText("status", `Classifying ${file.name} with ${model.name} version ${model.version}…`);
  $("result").hidden = true;
  $("overlay-figure").dataset.state = "loading";
  setText("overlay-caption", "Where the model looked: its attention over the photo, brighter where it weighed more");
  showObject($("overlay"), "overlay", null);

  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  let answer;
  try {
    const response = await fetch(`${modelPath(model)}/classify?top_k=${TOP_K}`, {
      method: "POST",
      headers: authHeaders(),
      body: form,
    });
    answer = response.ok ? await response.json() : new Error(await problem(response));
  } catch (error) {
    answer = error;
  }
  const elapsed = performance.now() - started;
  if (mine !== upload) return;
  if (answer instanceof Error) {
    setText("status", `Could not classify ${file.name}: ${answer.message}`);
    clearResult();
    results.dataset.state = "failed";
    results.setAttribute("aria-busy", "false");
    return;
  }

  const prediction = answer.predictions[0];
  showPhoto(file);
  renderTop(prediction.top);
  renderOod(prediction);
  const latency = $("latency");
  latency.dataset.ms = elapsed.toFixed(1);
  latency.textContent =
    `Answered in ${elapsed.toFixed(0)} ms, measured in this browser: ` +
    "upload, decoding, the model and the answer.";
  const best = prediction.top[0];
  setText("status", `${file.name}: ${best.label}, ${percent(best.probability)}.`);
  $("result").hidden = false;

  await showOverlay(model, file, mine);
  if (mine !== upload) return;
  results.dataset.state = "done";
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
    if (file) classify(file);
  });
  zone.addEventListener("click", () => $("file").click());
}

function start() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
  token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value));
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) classify(file);
  });
  $("model").addEventListener("change", () => {
    renderCard(models[Number($("model").value)]);
    if (lastFile) classify(lastFile);
  });
  acceptDrops();
  loadModels();
}

start();
