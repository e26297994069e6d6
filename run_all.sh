#!/usr/bin/env bash
# The main job, end to end: fetch MNIST if needed, train, export both routings to ONNX, run every
# backend this machine has (each appends its result to results.jsonl), then benchmark.py, which
# writes results/benchmark.{md,json,png}. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")"
rm -f results.jsonl
python train.py "$@"
python export_onnx.py
python export_onnx.py --routing loop
python torch_infer.py --json results.jsonl
python onnx_cpu_infer.py --json results.jsonl
python onnx_fp16_infer.py --json results.jsonl
python onnx_quantize_infer.py --json results.jsonl
has_provider() {
  python -c "import onnxruntime, sys; sys.exit('$1' not in onnxruntime.get_available_providers())"
}
for pair in CUDAExecutionProvider:onnx_cuda_infer.py TensorrtExecutionProvider:onnx_trt_infer.py; do
  if has_provider "${pair%%:*}"; then
    python "${pair#*:}" --json results.jsonl
  else
    echo "skipped ${pair#*:}: onnxruntime here has no ${pair%%:*} (see requirements-gpu.txt)"
  fi
done
python benchmark.py
