"""serve.py's backends: what each --backend is, and the runner module function that makes it. Only
the module of the backend being served is imported, so that serve.py and each of its workers and
model processes load that engine alone (a worker of --backend onnxruntime never imports torch or
OpenVINO); a Ray replica, sent only this package, makes its runner the same way."""
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Served:
    """--backend `backend`: `maker` names the function ('module:function' in moebench.runners) that
    makes its runner as make(model_path, checkpoint_path, threads, precision) does; `from_checkpoint`
    ones read the checkpoint with the repository's own files, so they serve on one machine only."""
    backend: str
    what: str
    maker: str
    from_checkpoint: bool = False

    def make(self, model_path, checkpoint_path=None, threads=0, precision="auto"):
        module, function = self.maker.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(
            model_path, checkpoint_path, threads, precision)


BACKENDS = {served.backend: served for served in (
    Served("onnxruntime", "ONNX Runtime, CPU", "onnx_runtime:served"),
    Served("openvino", "OpenVINO, CPU (bf16 where the CPU has it, unless --precision says otherwise)",
           "openvino_cpu:served"),
    Served("onnxruntime-cuda", "ONNX Runtime, CUDA (a CUDA machine with onnxruntime-gpu)",
           "onnx_runtime:served_on_cuda"),
    Served("fused-int8", "the fused INT8 operator (PyTorch custom op) built from --checkpoint; CPU, one machine "
                         "only", "pytorch:served_fused", from_checkpoint=True))}
