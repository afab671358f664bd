// What the static Spaces' pages share: decoding and resizing as the Python side does them
// (imagelab.images.open_rgb, Pillow's bilinear resize), so that the browser feeds a model what Python would,
// and the page's sources of images.
// imagelab.images.MAX_PIXELS, which the build writes into the page: a tiny file may claim a huge picture
const MAX_PIXELS = Number(document.querySelector('meta[name="imagelab-max-pixels"]').content);
const PRECISION_BITS = 22; // Pillow's fixed point for 8-bit resampling

// Bilinear weights exactly as Pillow computes them (Resample.c, precompute_coeffs and
// normalize_coeffs_8bpc): the Python Predictor resizes with Pillow, and a browser's own canvas scaling
// filters differently, enough to move the probabilities of a small model by several points.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filterscale; // the bilinear filter's support is 1, stretched when shrinking
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) / filterscale);
      w[x] = t < 1 ? 1 - t : 0;
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      kk[xx * ksize + x] = Math.trunc(0.5 + (ww !== 0 ? w[x] / ww : w[x]) * (1 << PRECISION_BITS));
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss) {
  return Math.min(255, Math.max(0, Math.floor(ss / (1 << PRECISION_BITS))));
}

// RGBA pixels (width x height) -> RGB (outW x outH): Pillow's two passes, horizontal first, 8-bit between.
export function resize(rgba, width, height, outW, outH) {
  const h = coefficients(width, outW);
  const tmp = new Uint8Array(outW * height * 3);
  for (let y = 0; y < height; y++) {
    for (let xx = 0; xx < outW; xx++) {
      const xmin = h.bounds[2 * xx], xmax = h.bounds[2 * xx + 1], k = xx * h.ksize;
      for (let c = 0; c < 3; c++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += rgba[(y * width + x + xmin) * 4 + c] * h.kk[k + x];
        tmp[(y * outW + xx) * 3 + c] = clip8(ss);
      }
    }
  }
  const v = coefficients(height, outH);
  const out = new Uint8Array(outW * outH * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = v.bounds[2 * yy], ymax = v.bounds[2 * yy + 1], k = yy * v.ksize;
    for (let i = 0; i < outW * 3; i++) {
      let ss = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < ymax; y++) ss += tmp[(y + ymin) * outW * 3 + i] * v.kk[k + y];
      out[yy * outW * 3 + i] = clip8(ss);
    }
  }
  return out;
}

// The width and height a PNG, GIF, BMP, WebP or JPEG file's header claims (null for other formats or a header
// that does not say), read without decoding the picture.
async function claimedSize(blob) {
  const b = new DataView(await blob.slice(0, 65536).arrayBuffer()), n = b.byteLength;
  const ascii = (at, length) => n >= at + length ?
    String.fromCharCode(...new Uint8Array(b.buffer, at, length)) : "";
  if (ascii(1, 3) === "PNG" && n >= 24) return [b.getUint32(16), b.getUint32(20)];
  if (ascii(0, 3) === "GIF" && n >= 10) return [b.getUint16(6, true), b.getUint16(8, true)];
  if (ascii(0, 2) === "BM" && n >= 26) return [Math.abs(b.getInt32(18, true)), Math.abs(b.getInt32(22, true))];
  if (ascii(0, 4) === "RIFF" && ascii(8, 4) === "WEBP" && n >= 30) {
    const kind = ascii(12, 4);
    if (kind === "VP8X") return [1 + (b.getUint32(24, true) & 0xffffff), 1 + (b.getUint32(27, true) & 0xffffff)];
    if (kind === "VP8L") { const v = b.getUint32(21, true); return [1 + (v & 0x3fff), 1 + ((v >> 14) & 0x3fff)]; }
    if (kind === "VP8 ") return [b.getUint16(26, true) & 0x3fff, b.getUint16(28, true) & 0x3fff];
  }
  if (n >= 4 && b.getUint16(0) === 0xffd8) { // JPEG: walk the markers to the frame header
    for (let at = 2; at + 9 <= n && b.getUint8(at) === 0xff;) {
      const marker = b.getUint8(at + 1);
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return [b.getUint16(at + 7), b.getUint16(at + 5)];
      }
      at += 2 + b.getUint16(at + 2);
    }
  }
  return null;
}

// One line, before any decoding, for a file whose header claims more than MAX_PIXELS (as imagelab.images).
export async function checkSize(blob) {
  const size = blob instanceof Blob ? await claimedSize(blob) : null;
  if (size && size[0] * size[1] > MAX_PIXELS) throw new Error(`image too large: ${size[0]}x${size[1]} pixels`);
}

// Any image a page has (File or Blob, URL, <img>, <video>, <canvas>, ImageBitmap) as upright RGBA pixels,
// transparency on white: the decoding of imagelab.images.open_rgb (EXIF rotation, no colour management).
export async function pixels(image) {
  const source = typeof image === "string" || image instanceof URL ? await (await fetch(image)).blob() : image;
  await checkSize(source);
  let bitmap;
  try {
    bitmap = await createImageBitmap(source, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                               premultiplyAlpha: "none" });
  } catch (e) {
    throw new Error(`not a readable image (${e.message})`);
  }
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) throw new Error(`image too large: ${width}x${height} pixels`);
  const ctx = new OffscreenCanvas(width, height).getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { data: ctx.getImageData(0, 0, width, height).data, width, height };
}

// Where a page's images come from: the upload control, a drop, a paste, the examples and the webcam. Each is
// shown in #preview and handed to `show(blob, name, current)`, where `current()` says whether it is still the
// latest image (an earlier one's result may arrive after a later image is shown: it must not be drawn beside
// it); `status(text)` says what went wrong.
export function imageSources(show, status) {
  const $ = (id) => document.getElementById(id);
  let latest = 0, running = 0;
  // while any image is still being worked on (an earlier one's result, to be dropped, included): for screen
  // readers, and for whoever must know that no earlier result can still arrive
  const working = (n) => $("output").setAttribute("aria-busy", (running += n) > 0);
  // a file the browser cannot show: no broken-image icon beside the page's reason
  $("preview").addEventListener("error", () => $("preview").removeAttribute("src"));
  const preview = async (blob, name) => {
    const turn = ++latest, current = () => turn === latest;
    working(1);
    try {
      await checkSize(blob); // before the preview decodes it: a tiny file may claim a huge picture
      $("preview").src = URL.createObjectURL(blob);
    } catch (e) {
      $("preview").removeAttribute("src"); // `show` says why, as for any unreadable image
    }
    try {
      return await show(blob, name, current);
    } finally {
      working(-1);
    }
  };
  $("upload").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) preview(f, f.name); });
  // a picture that came another way: the file field must not go on naming the last file chosen
  const other = (blob, name) => { $("upload").value = ""; return preview(blob, name); };
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) other(f, f.name);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) other(item.getAsFile(), "pasted image");
  });
  for (const button of document.querySelectorAll("#examples button")) {
    button.addEventListener("click", async () => {
      const src = button.querySelector("img").getAttribute("src");
      other(await (await fetch(src)).blob(), src.split("/").pop());
    });
  }

  let stream = null;
  $("webcam").addEventListener("click", async () => {
    const video = $("video");
    if (stream) {
      const canvas = document.createElement("canvas");
      [canvas.width, canvas.height] = [video.videoWidth, video.videoHeight];
      canvas.getContext("2d").drawImage(video, 0, 0);
      canvas.toBlob((blob) => other(blob, "webcam photo"), "image/png");
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: true });
      video.srcObject = stream;
      video.hidden = false;
      $("webcam").textContent = "Take photo";
    } catch (e) {
      status(`No webcam: ${e.message}`);
    }
  });
}
