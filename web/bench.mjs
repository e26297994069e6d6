// The measurement web_infer.py and benchmark.py read, in the page: the test images through the model
// at each batch size asked (several passes each) and one at a time (latencies), warm-up excluded,
// timed with performance.now() around session.run from Float32Arrays made before any clock starts.
// The result (or {error}) goes to window.benchResult; window.benchProgress says how far it is.
import {createSession, loadOrt, run, toFloats, webgpuAdapter, whatRan} from "./moe.mjs";

const PIXELS = 28 * 28;
const query = new URLSearchParams(location.search);
const settings = {provider: query.get("provider") || "wasm", model: query.get("model") || "/model.onnx",
                  sizes: (query.get("sizes") || "1024").split(",").map(Number), runs: +query.get("runs") || 1000,
                  repeats: +query.get("repeats") || 5, warmups: +query.get("warmups") || 3,
                  threads: +query.get("threads") || 0};
window.benchProgress = {done: 0, total: 1, stage: "loading"};

async function fullPass(ort, session, floats, batch, logits) {
  const count = floats.length / PIXELS;
  for (let start = 0; start < count; start += batch) {
    const size = Math.min(batch, count - start);
    const out = await run(ort, session, floats.subarray(start * PIXELS, (start + size) * PIXELS));
    if (logits) logits.set(out.logits, start * 10);
  }
}

function base64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function measure() {
  if (settings.provider === "webgpu") {
    const {adapter, reason} = await webgpuAdapter();
    if (!adapter) return {available: false, reason};
  }
  const ort = await loadOrt(settings.provider);
  let started = performance.now();
  const session = await createSession(ort, settings.provider, settings.threads, settings.model);
  const setupMs = performance.now() - started;
  const pixels = new Uint8Array(await (await fetch("/test-images.bin")).arrayBuffer());
  const floats = toFloats(pixels);
  const count = floats.length / PIXELS;
  const sizes = settings.sizes.map((size) => Math.min(size, count));
  window.benchProgress = {done: 0, total: settings.repeats * sizes.length + 2, stage: "warm-up"};
  for (let i = 0; i < settings.warmups; i++) {
    for (const size of sizes) await fullPass(ort, session, floats.subarray(0, size * PIXELS), size, null);
    await run(ort, session, floats.subarray(0, PIXELS));
  }
  const logits = new Float32Array(count * 10);
  await fullPass(ort, session, floats, sizes[0], logits);
  window.benchProgress.done = 1;
  window.benchProgress.stage = "test set passes";
  const passesMs = Object.fromEntries(sizes.map((size) => [size, []]));
  for (let i = 0; i < settings.repeats; i++) {
    for (const size of sizes) {
      started = performance.now();
      await fullPass(ort, session, floats, size, null);
      passesMs[size].push(performance.now() - started);
      window.benchProgress.done += 1;
    }
  }
  window.benchProgress.stage = "batch-1 latency";
  const latenciesMs = [];
  for (let i = 0; i < settings.runs; i++) {
    const image = floats.subarray((i % count) * PIXELS, (i % count + 1) * PIXELS);
    started = performance.now();
    await run(ort, session, image);
    latenciesMs.push(performance.now() - started);
  }
  window.benchProgress.done += 1;
  return {available: true, ...whatRan(ort, settings.provider), setupMs, images: count, passesMs,
          latenciesMs, logits: base64(logits)};
}

measure().then((result) => { window.benchResult = result; },
               (error) => { window.benchResult = {error: String(error && error.message ? error.message : error)}; });
