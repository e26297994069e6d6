#!/usr/bin/env bash
# The main job, end to end: fetch MNIST if needed, train, export both routings to ONNX, run every
# backend script this machine has (each appends its result to results.jsonl), then benchmark.py,
# sweep.py and loadgen.py, which write results/. Extra arguments go to train.py.
#
# bash run_all.sh --quick: the same steps on little work (1 epoch on 5000 training images, 1000 test
# images, short timings) as a smoke test; its reports go to results/quick/, results/ is left alone.
set -euo pipefail
cd "$(dirname "$0")"
out=results
train=()
each=()
smoke=()
if [ "${1:-}" = "--quick" ]; then
  shift
  out=results/quick
  train=(--epochs 1 --train-limit 5000 --quiet)
  each=(--test-limit 1000 --latency-runs 50 --quiet)
  smoke=(--quick --test-limit 1000)
fi
mkdir -p "$out"
jsonl="$out/results.jsonl"
rm -f "$jsonl"
has_provider() {
  python -c "import onnxruntime, sys; sys.exit('$1' not in onnxruntime.get_available_providers())"
}

python train.py ${train[@]+"${train[@]}"} "$@"
python export_onnx.py
python export_onnx.py --routing loop
python plot_routing.py --output "$out/routing.png"
python torch_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
python onnx_cpu_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
python openvino_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
python openvino_infer.py --routing loop --int8 --json "$jsonl" ${each[@]+"${each[@]}"}
python onnx_fp16_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
python onnx_quantize_infer.py --json "$jsonl" ${each[@]+"${each[@]}"}
python onnx_trt_infer.py --check-only
for pair in CUDAExecutionProvider:onnx_cuda_infer.py TensorrtExecutionProvider:onnx_trt_infer.py; do
  if has_provider "${pair%%:*}"; then
    python "${pair#*:}" --json "$jsonl" ${each[@]+"${each[@]}"}
  else
    echo "skipped ${pair#*:}: onnxruntime here has no ${pair%%:*} (see requirements-gpu.txt)"
  fi
done
python benchmark.py --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
if has_provider CUDAExecutionProvider; then
  python benchmark.py --device cuda --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
fi
python sweep.py --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
python loadgen.py --out-dir "$out" ${smoke[@]+"${smoke[@]}"}
echo "done: checkpoint.pt, model.pt, training.png, model.onnx, model.loop.onnx and $out/"
