"""The runners serve.py can serve, made from the model file's bytes (or, for the fused operator, the
checkpoint). The ONNX ones import nothing outside this package: a Ray worker on another node has only
the package."""
import os
import tempfile

from . import onnx_runtime, openvino_cpu

SERVED = {  # --backend: what it is
    "onnxruntime": "ONNX Runtime, CPU",
    "onnxruntime-cuda": "ONNX Runtime, CUDA (a CUDA machine with onnxruntime-gpu)",
    "openvino": "OpenVINO, CPU (bf16 where the CPU has it, unless --precision says otherwise)",
    "fused-int8": "the fused INT8 operator (PyTorch custom op) built from --checkpoint; CPU, one machine only",
}
FROM_CHECKPOINT = ("fused-int8",)


def served_runner(backend, model_bytes, threads=0, precision="auto", checkpoint_path=None):
    """A runner for `backend`: from the ONNX model's bytes (engines read the file once; it is gone
    after), or for the fused operator from the checkpoint at checkpoint_path."""
    if backend in FROM_CHECKPOINT:
        return fused_runner(checkpoint_path, threads)
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


def fused_runner(checkpoint_path, threads):
    """The fused operator reads the checkpoint, and with it the model's own files (config.py, moe.py):
    it runs where the repository is, never on a Ray worker that has only this package."""
    import torch

    from .. import checkpoint
    from . import pytorch
    if threads:
        torch.set_num_threads(threads)
    model, structure, _ = checkpoint.load_model(checkpoint_path, {"ROUTING": "dense"})
    return pytorch.runner("fused-int8", model, structure, name="fused INT8 operator")
