#!/usr/bin/env bash
# The main job, end to end: fetch MNIST if needed, train, export both routings to ONNX, run every
# backend script this machine has (each appends its result to results/results.jsonl), then
# benchmark.py, sweep.py and loadgen.py, which write results/. Extra arguments go to train.py.
# onnxruntime-web comes from the npm registry (web/package-lock.json pins it) where npm is present; the
# browser rows run where Chromium and chromedriver are too.
#
# bash run_all.sh --quick: the same steps on little work (1 epoch on 5000 training images, 1000 test
# images, short timings) as a smoke test. It runs inside results/quick/: its checkpoint, models and
# reports are written there, and the trained files in the repository root and results/ are left alone.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"
work="$repo"
out="$repo/results"
train=()
each=()
smoke=()
if [ "${1:-}" = "--quick" ]; then
  shift
  work="$repo/results/quick"
  out="$work"
  train=(--epochs 1 --train-limit 5000 --quiet)
  each=(--test-limit 1000 --latency-runs 50 --quiet)
  smoke=(--quick --test-limit 1000)
fi
mkdir -p "$out"
cd "$work"
data=(--data-dir "${MNIST_DIR:-$repo/data}")
jsonl="$out/results.jsonl"
rm -f "$jsonl"
has_provider() {
  python -c "import onnxruntime, sys; sys.exit('$1' not in onnxruntime.get_available_providers())"
}
script() {  # a repository script, run here in $work so that its default files are this run's own
  local name="$1"
  shift
  python "$repo/$name" "${data[@]}" "$@"
}

web=()
if ! command -v npm >/dev/null; then
  echo "skipped the browser rows: no npm here to install onnxruntime-web (install Node.js, then npm ci --prefix web)"
elif ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "skipped the browser rows: no Chromium and chromedriver here (bash tests/install_tools.sh)"
else
  npm ci --prefix "$repo/web" --ignore-scripts --no-audit --no-fund --loglevel=error
  web=(--web)
fi

command -v wrk >/dev/null || echo "skipped the C client's serving rows: no wrk here (bash tests/install_tools.sh)"

script train.py --report-dir "$out" ${train[@]+"${train[@]}"} "$@"
script export_onnx.py
script plot_routing.py --output "$out/routing.png"
script torch_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script onnx_cpu_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script onnx_cpu_infer.py --routing loop --json "$jsonl" ${each[@]+"${each[@]}"}
script openvino_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script openvino_infer.py --routing loop --int8 --json "$jsonl" ${each[@]+"${each[@]}"}
script onnx_fp16_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script onnx_quantize_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script iree_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script mnn_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script mnn_infer.py --routing loop --json "$jsonl" ${each[@]+"${each[@]}"}
script mnn_infer.py --int8 --json "$jsonl" ${each[@]+"${each[@]}"}
script tvm_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script ncnn_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script litert_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script litert_infer.py --int8 --json "$jsonl" ${each[@]+"${each[@]}"}
script executorch_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
script executorch_infer.py --int8 --json "$jsonl" ${each[@]+"${each[@]}"}
if [ ${#web[@]} -gt 0 ]; then
  script web_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
fi
python "$repo/onnx_trt_infer.py" --check-only
for pair in CUDAExecutionProvider:onnx_cuda_infer.py TensorrtExecutionProvider:onnx_trt_infer.py; do
  if has_provider "${pair%%:*}"; then
    script "${pair#*:}" --json "$jsonl" ${each[@]+"${each[@]}"}
  else
    echo "skipped ${pair#*:}: onnxruntime here has no ${pair%%:*} (see requirements-gpu.txt)"
  fi
done
script benchmark.py --out-dir "$out" ${web[@]+"${web[@]}"} ${smoke[@]+"${smoke[@]}"}
if has_provider CUDAExecutionProvider; then
  script benchmark.py --device cuda --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
fi
script sweep.py --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
script loadgen.py --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
echo "done: in $work: checkpoint.pt, model.pt, training.png, model.onnx, model.loop.onnx; reports in $out/"
