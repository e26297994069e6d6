"""The runners serve.py's replicas can use, made from the model file's bytes. This part of the
registry imports nothing outside this package: a Ray worker on another node has only the package."""
import os
import tempfile

from . import onnx_runtime, openvino_cpu

SERVED = {  # --backend: what it is
    "onnxruntime": "ONNX Runtime, CPU",
    "onnxruntime-cuda": "ONNX Runtime, CUDA (a CUDA machine with onnxruntime-gpu)",
    "openvino": "OpenVINO, CPU (bf16 where the CPU has it, unless --precision says otherwise)",
}


def served_runner(backend, model_bytes, threads=0, precision="auto"):
    """A runner for `backend` from the ONNX model's bytes (engines read the file once; it is gone after)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model_bytes)
        if backend == "openvino":
            return openvino_cpu.runner(path, f"OpenVINO CPU, {precision}", precision=precision)
        cuda = backend == "onnxruntime-cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        return onnx_runtime.runner(path, f"ONNX Runtime {'CUDA' if cuda else 'CPU'}", providers,
                                   onnx_runtime.session_options(threads=threads))
