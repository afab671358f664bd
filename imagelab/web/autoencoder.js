// The autoencoder of a static Space, run in the browser by onnxruntime-web: an image as the model sees it, its
// reconstruction and PCA's, with their PSNRs, and the images between two codes. The page's upload, paste, webcam
// and examples all go through `window.imagelab.reconstruct`, its walk through `interpolate`, which scripts (and
// the tests) call too.
import * as ort from "./onnxruntime-web/ort.wasm.bundle.min.js";
import { imageSources, pixels, resize } from "./images.js";

const MODEL = document.querySelector('meta[name="imagelab-model"]').content;

// As imagelab.inference.square_input: fastai's validation Resize, the centre square (in fastai's arithmetic,
// images.resize_box), resized to the model's size as Pillow does; 1x3xSxS in [0, 1], float32.
export function prepare({ data, width, height }, size) {
  const m = width / size < height / size ? width / size : height / size;
  const side = Math.trunc(m * size);
  const left = Math.trunc(0.5 * (width - side)), top = Math.trunc(0.5 * (height - side));
  const square = new Uint8ClampedArray(side * side * 4);
  for (let y = 0; y < side; y++) {
    square.set(data.subarray(((y + top) * width + left) * 4, ((y + top) * width + left + side) * 4), y * side * 4);
  }
  const rgb = resize(square, side, side, size, size);
  const x = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < size * size; i++) x[c * size * size + i] = Math.fround(rgb[i * 3 + c] / 255);
  }
  return x;
}

function psnr(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += (a[i] - b[i]) ** 2;
  const mse = sum / a.length;
  return mse > 0 ? 10 * Math.log10(1 / mse) : Infinity;
}

async function load() {
  const config = await (await fetch(`${MODEL}.config.json`)).json();
  const options = { executionProviders: ["wasm"] };
  const session = await ort.InferenceSession.create(`${MODEL}.onnx`, options);
  for (const name of ["reconstruction", "pca", "code"]) {
    if (!session.outputNames.includes(name)) {
      throw new Error(`${MODEL}.onnx has no output named "${name}" (it has ${session.outputNames.join(", ")}): ` +
                      "retrain the model with this version of training/train_autoencoder.py");
    }
  }
  const decoder = await ort.InferenceSession.create(`${MODEL}.decoder.onnx`, options);
  return { config, session, decoder };
}

const model = load();
let queue = Promise.resolve(); // one run at a time: a wasm session is not re-entrant

function inTurn(run) {
  const result = queue.then(run);
  queue = result.catch(() => {});
  return result;
}

// {size, view, reconstruction, pca, code, psnr, pcaPsnr}: the three pictures as 3xSxS floats in [0, 1], the code,
// PSNRs in dB.
async function reconstruct(image) {
  const { config, session } = await model;
  const size = config.size, view = prepare(await pixels(image), size);
  const out = await inTurn(() => session.run({ image: new ort.Tensor("float32", view, [1, 3, size, size]) }));
  const reconstruction = out.reconstruction.data, pca = out.pca.data;
  return { size, view, reconstruction, pca, code: out.code.data, psnr: psnr(reconstruction, view),
           pcaPsnr: psnr(pca, view) };
}

// As imagelab.inference.Reconstructor.interpolate: the decodings of `steps` codes evenly spaced from `a`'s code
// to `b`'s, each 3xSxS.
async function interpolate(a, b, steps = 8) {
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`steps must be a whole number, at least 1: not ${steps}`);
  const { decoder } = await model;
  const [ra, rb] = [await reconstruct(a), await reconstruct(b)];
  const frames = [];
  for (let i = 0; i < steps; i++) {
    const t = Math.fround(steps > 1 ? i / (steps - 1) : 0); // NumPy's linspace(0, 1, steps)
    const code = ra.code.map((v, j) => Math.fround(Math.fround(1 - t) * v) + Math.fround(t * rb.code[j]));
    const out = await inTurn(() => decoder.run({ code: new ort.Tensor("float32", code, [1, code.length]) }));
    frames.push(out.image.data);
  }
  return { size: ra.size, frames };
}

window.imagelab = { reconstruct, interpolate, ready: model.then(({ config }) => config.size) };

// The page
const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };

// A 3xSxS picture in [0, 1] onto `canvas` at column `left`, rounded to 8 bits as imagelab.inference.to_image does.
function draw(canvas, x, size, left = 0) {
  const image = canvas.getContext("2d").createImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    for (let c = 0; c < 3; c++) image.data[i * 4 + c] = Math.round(Math.min(1, Math.max(0, x[c * size * size + i])) * 255);
    image.data[i * 4 + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, left, 0);
}

// Empties the pictures of `ids`: a refused image must not stand beside the last one's results.
function blank(...ids) {
  for (const id of ids) $(id).getContext("2d").clearRect(0, 0, $(id).width, $(id).height);
}

async function show(image, name, current = () => true) {
  const figures = $("figures");
  status(`Encoding ${name}...`);
  try {
    const r = await reconstruct(image);
    if (!current()) return; // a later image is shown: its result is the one to show
    for (const id of ["view", "reconstruction", "pca"]) draw($(id), r[id], r.size);
    const gain = r.psnr - r.pcaPsnr;
    $("psnr").innerHTML = `<b>Autoencoder: PSNR ${r.psnr.toFixed(2)} dB</b> · PCA with as many components: ` +
      `PSNR ${r.pcaPsnr.toFixed(2)} dB (${gain >= 0 ? "+" : ""}${gain.toFixed(2)} dB)`;
    Object.assign(figures.dataset, { source: name, psnr: r.psnr, pcaPsnr: r.pcaPsnr });
    status("");
  } catch (e) {
    if (!current()) return;
    blank("view", "reconstruction", "pca");
    Object.assign(figures.dataset, { source: "", psnr: "", pcaPsnr: "" });
    $("psnr").textContent = "";
    status(`${name}: ${e.message}`);
  }
}

imageSources(show, status);

let walks = 0, walkFailed = false; // as the upload's turns: only the latest walk is drawn

async function walk() {
  const [a, b] = [$("from").files[0], $("to").files[0]];
  const steps = Math.min(12, Math.max(3, Math.round(Number($("steps").value)) || 8));
  $("steps").value = steps; // the number of images drawn, when the box held another
  const canvas = $("walk"), turn = ++walks;
  if (!a || !b) {
    blank("walk");
    canvas.dataset.source = "";
    return;
  }
  try {
    const { size, frames } = await interpolate(a, b, steps);
    if (turn !== walks) return;
    [canvas.width, canvas.height] = [size * steps, size];
    frames.forEach((frame, i) => draw(canvas, frame, size, i * size));
    canvas.dataset.source = `${a.name} -> ${b.name} in ${steps}`;
    if (walkFailed) status(""); // its own message only: the upload's stays
    walkFailed = false;
  } catch (e) {
    if (turn !== walks) return;
    blank("walk");
    canvas.dataset.source = "";
    status(`${a.name} -> ${b.name}: ${e.message}`);
    walkFailed = true;
  }
}
for (const id of ["from", "to", "steps"]) $(id).addEventListener("change", walk);

model.then(({ config }) => {
  status("");
  for (const id of ["upload", "from", "to"]) $(id).disabled = false;
  document.body.dataset.ready = String(config.size);
}, (e) => status(`The model did not load: ${e.message}`));
