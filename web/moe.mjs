// The model in the page: onnxruntime-web loaded from this page's own server (/ort/), the model file
// it serves at /model.onnx, and the input contract every backend of this project keeps:
// float32 (N, 1, 28, 28) pixels in [0, 1] in, logits (N, 10) and the gate's weights (N, experts) out.

const PIXELS = 28 * 28;

export async function loadOrt(provider) {
  // the plain WebAssembly build for the wasm provider; WebGPU lives in its own build
  const ort = await import(provider === "webgpu" ? "/ort/ort.webgpu.min.mjs" : "/ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = "/ort/";  // never a CDN: every file comes from this server
  return ort;
}

export async function webgpuAdapter() {
  // null, with the reason, when this browser offers no WebGPU adapter
  if (!navigator.gpu) return {adapter: null, reason: "this browser has no navigator.gpu"};
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return {adapter: null, reason: "navigator.gpu.requestAdapter() found no adapter (no usable GPU)"};
  return {adapter, reason: ""};
}

export async function createSession(ort, provider, threads, url = "/model.onnx") {
  if (threads > 0) ort.env.wasm.numThreads = threads;
  return ort.InferenceSession.create(url, {executionProviders: [provider], graphOptimizationLevel: "all"});
}

export function toFloats(uint8) {
  const floats = new Float32Array(uint8.length);
  for (let i = 0; i < uint8.length; i++) floats[i] = uint8[i] / 255;
  return floats;
}

export async function run(ort, session, floats) {
  // floats: count * 784 values; returns {logits, gates} as flat Float32Arrays (gates null if absent)
  const count = floats.length / PIXELS;
  const outputs = await session.run({pixels: new ort.Tensor("float32", floats, [count, 1, 28, 28])});
  return {logits: outputs.logits.data, gates: outputs.gates ? outputs.gates.data : null};
}

export function whatRan(ort, provider) {
  // read back from the library and the page, not from what was asked
  const wasmFiles = performance.getEntriesByType("resource").map((entry) => entry.name.split("/").pop())
    .filter((name) => name.endsWith(".wasm"));
  return {provider, ortVersion: ort.env.versions ? ort.env.versions.web : "unknown",
          threads: ort.env.wasm.numThreads, crossOriginIsolated: self.crossOriginIsolated,
          hardwareConcurrency: navigator.hardwareConcurrency, wasmFiles, userAgent: navigator.userAgent};
}
