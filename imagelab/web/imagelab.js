// The classifier of a static Space, run in the browser by onnxruntime-web; the page's upload, paste, webcam
// and examples all go through `window.imagelab.classify`, which scripts (and the tests) call too.
import * as ort from "./onnxruntime-web/ort.wasm.bundle.min.js";
import { imageSources, pixels, resize } from "./images.js";

const MODEL = document.querySelector('meta[name="imagelab-model"]').content;

// The learner's validation transforms, as imagelab.inference.preprocess: squash to `resize`, centre crop
// to `crop`, scale to [0, 1], normalise; float32 at each step like NumPy; 1x3xHxW.
export function preprocess({ data, width, height }, config) {
  const [W, H] = config.resize, [w, h] = config.crop;
  const rgb = resize(data, width, height, W, H);
  const left = Math.floor((W - w) / 2), top = Math.floor((H - h) / 2);
  const mean = config.mean.map(Math.fround), std = config.std.map(Math.fround);
  const x = new Float32Array(3 * h * w);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < h; y++) {
      for (let i = 0; i < w; i++) {
        const v = Math.fround(rgb[((y + top) * W + i + left) * 3 + c] / 255);
        x[(c * h + y) * w + i] = Math.fround(v - mean[c]) / std[c];
      }
    }
  }
  return x;
}

async function load() {
  const config = await (await fetch(`${MODEL}.config.json`)).json();
  const session = await ort.InferenceSession.create(`${MODEL}.onnx`, { executionProviders: ["wasm"] });
  if (!session.outputNames.includes("logits")) {
    throw new Error(`${MODEL}.onnx has no output named "logits" (it has ${session.outputNames.join(", ")})`);
  }
  return { config, session };
}

const model = load();
let queue = Promise.resolve(); // one run at a time: a wasm session is not re-entrant

async function run(input, config, session) {
  const [w, h] = config.crop;
  const out = await session.run({ image: new ort.Tensor("float32", input, [1, 3, h, w]) }, ["logits"]);
  const logits = Array.from(out.logits.data), top = Math.max(...logits);
  const e = logits.map((z) => Math.exp(z - top)), sum = e.reduce((a, b) => a + b, 0);
  return config.vocab.map((label, i) => ({ label, confidence: e[i] / sum }))
    .sort((a, b) => b.confidence - a.confidence);
}

// Every class with its probability, most likely first.
async function classify(image) {
  const { config, session } = await model;
  const input = preprocess(await pixels(image), config);
  const result = queue.then(() => run(input, config, session));
  queue = result.catch(() => {});
  return result;
}

window.imagelab = { classify, ready: model.then(({ config }) => config.vocab) };

// The page
const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };

async function show(image, name, current = () => true) {
  const results = $("results");
  status(`Classifying ${name}...`);
  try {
    const top = (await classify(image)).slice(0, 3);
    if (!current()) return; // a later image is shown: its result is the one to show
    results.replaceChildren(...top.map(({ label, confidence }) => {
      const li = document.createElement("li");
      li.dataset.label = label;
      li.dataset.confidence = confidence;
      li.innerHTML = '<span class="label"></span><meter min="0" max="1"></meter><span class="pct"></span>';
      li.querySelector(".label").textContent = label;
      li.querySelector("meter").value = confidence;
      li.querySelector(".pct").textContent = `${(100 * confidence).toFixed(1)}%`;
      return li;
    }));
    results.dataset.source = name;
    status("");
  } catch (e) {
    if (!current()) return;
    results.replaceChildren();
    results.dataset.source = "";
    status(`${name}: ${e.message}`);
  }
}

imageSources(show, status);

model.then(({ config }) => {
  status("");
  $("upload").disabled = false;
  document.body.dataset.ready = config.vocab.join(",");
}, (e) => status(`The model did not load: ${e.message}`));
