// The drawing page: strokes on a 280x280 canvas become a 28x28 image the way MNIST made its digits
// (the ink's bounding box scaled to fit 20x20, then placed so its centre of mass is at the centre),
// and the same model.onnx computes, in this page, the class, the ten scores and the gate's choice.
// window.demoState holds what the page fed the model and what it answered (for the browser test).
import {createSession, loadOrt, run, toFloats, whatRan} from "./moe.mjs";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d", {willReadFrequently: true});
const seen = document.getElementById("seen").getContext("2d");
const status = document.getElementById("status");
window.demoState = {ready: false, runs: 0};

function clear() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  seen.fillStyle = "#000";
  seen.fillRect(0, 0, 28, 28);
}

function inkBox() {
  const {data, width, height} = ink.getImageData(0, 0, pad.width, pad.height);
  let left = width, top = height, right = -1, bottom = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[4 * (y * width + x)] > 0) {
        left = Math.min(left, x); right = Math.max(right, x);
        top = Math.min(top, y); bottom = Math.max(bottom, y);
      }
    }
  }
  return right < 0 ? null : {left, top, width: right - left + 1, height: bottom - top + 1};
}

function mnistPixels() {
  // uint8 28x28, white digit on black, or null when nothing is drawn
  const box = inkBox();
  if (!box) return null;
  const scale = 20 / Math.max(box.width, box.height);
  const width = Math.max(1, Math.round(box.width * scale)), height = Math.max(1, Math.round(box.height * scale));
  const small = new OffscreenCanvas(width, height).getContext("2d", {willReadFrequently: true});
  small.imageSmoothingQuality = "high";
  small.drawImage(pad, box.left, box.top, box.width, box.height, 0, 0, width, height);
  const values = small.getImageData(0, 0, width, height).data;
  let mass = 0, sumX = 0, sumY = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const v = values[4 * (y * width + x)];
      mass += v; sumX += v * x; sumY += v * y;
    }
  }
  const shiftX = Math.round(14 - (mass ? sumX / mass : width / 2) - 0.5);
  const shiftY = Math.round(14 - (mass ? sumY / mass : height / 2) - 0.5);
  const pixels = new Uint8Array(28 * 28);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const tx = x + shiftX, ty = y + shiftY;
      if (tx >= 0 && tx < 28 && ty >= 0 && ty < 28) pixels[ty * 28 + tx] = values[4 * (y * width + x)];
    }
  }
  return pixels;
}

function showSeen(pixels) {
  const image = seen.createImageData(28, 28);
  pixels.forEach((v, i) => { image.data.set([v, v, v, 255], 4 * i); });
  seen.putImageData(image, 0, 0);
}

function softmax(logits) {
  const top = Math.max(...logits);
  const exps = logits.map((v) => Math.exp(v - top));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((v) => v / sum);
}

function showAnswer(logits, gates, ms, about) {
  const best = logits.indexOf(Math.max(...logits));
  document.getElementById("answer").textContent = String(best);
  document.getElementById("scores").innerHTML = softmax(logits).map((p, digit) =>
    `<div class="bar${digit === best ? " top" : ""}"><span>${digit}</span>` +
    `<div style="width:${Math.max(1, Math.round(220 * p))}px"></div><em>${(100 * p).toFixed(1)}%</em></div>`).join("");
  document.getElementById("experts").innerHTML = gates.map((weight, expert) =>
    `<div class="expert${weight > 0 ? " chosen" : ""}">expert ${expert}<b>${weight > 0 ? weight.toFixed(3) : "-"}</b></div>`).join("");
  document.getElementById("timing").textContent =
    `inference ${ms.toFixed(2)} ms in this page (onnxruntime-web ${about.ortVersion}, ${about.provider}, ` +
    `${about.threads} thread${about.threads === 1 ? "" : "s"})`;
}

async function main() {
  const ort = await loadOrt("wasm");
  const session = await createSession(ort, "wasm", 0);
  await run(ort, session, new Float32Array(28 * 28));  // warm-up: the first run allocates
  const about = whatRan(ort, "wasm");
  clear();
  status.textContent = "draw a digit with the mouse or a finger; the model runs when you lift it";
  window.demoState = {ready: true, runs: 0, about};

  async function classify() {
    const pixels = mnistPixels();
    if (!pixels) return;
    showSeen(pixels);
    const started = performance.now();
    const {logits, gates} = await run(ort, session, toFloats(pixels));
    const ms = performance.now() - started;
    showAnswer(Array.from(logits), Array.from(gates), ms, about);
    window.demoState = {ready: true, runs: window.demoState.runs + 1, about, ms, pixels: Array.from(pixels),
                        logits: Array.from(logits), gates: Array.from(gates),
                        answer: Array.from(logits).indexOf(Math.max(...logits))};
  }

  let drawing = false;
  const at = (event) => {
    const rect = pad.getBoundingClientRect();
    return [(event.clientX - rect.left) * pad.width / rect.width, (event.clientY - rect.top) * pad.height / rect.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    ink.strokeStyle = "#fff"; ink.lineWidth = 22; ink.lineCap = ink.lineJoin = "round";
    ink.beginPath();
    ink.moveTo(...at(event));
    ink.lineTo(...at(event));
    ink.stroke();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ink.lineTo(...at(event));
    ink.stroke();
  });
  const finish = () => { if (drawing) { drawing = false; classify(); } };
  pad.addEventListener("pointerup", finish);
  pad.addEventListener("pointercancel", finish);
  document.getElementById("clear").addEventListener("click", () => {
    clear();
    document.getElementById("answer").textContent = "?";
  });
}

main().catch((error) => {
  status.textContent = `the model did not load: ${error && error.message ? error.message : error}`;
  window.demoState = {ready: false, error: String(error && error.message ? error.message : error)};
});
