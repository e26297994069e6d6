"""Every runner this project has, by name: what benchmark.py, sweep.py, loadgen.py and serve.py
compose. An entry says what it is (group, routing, precision) and makes its runner from Sources."""
import os
from dataclasses import dataclass
from typing import Callable

import config

from .. import checkpoint, convert, fused
from . import onnx_runtime, openvino_cpu, pytorch, served
from .base import Runner

SERVED = served.SERVED  # serve.py's runners: a part of the registry a Ray worker can import on its own
REFERENCE = "ONNX Runtime CPU, dense, torchscript"  # fp32, what the other rows are compared with
INT8_VARIANTS = (("dynamic", False, False), ("dynamic", True, False), ("dynamic", False, True),
                 ("static QDQ", False, False), ("static QDQ", True, False), ("static QDQ", False, True))
CPU = ["CPUExecutionProvider"]
CUDA = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


class Sources:
    """What runners are made from, each made once when first asked for: the checkpoint's model per
    routing, its ONNX exports (checked against torch before they appear), their FP16 and INT8
    copies, and training images for calibration. `onnx_files` names exports that already exist."""

    def __init__(self, checkpoint_path=checkpoint.DEFAULT_PATH, workdir=None, test_set=None, data_dir="data",
                 onnx_files=None, calibration_images=1000):
        self.checkpoint_path, self.workdir, self.test_set = checkpoint_path, workdir, test_set
        self.data_dir, self.calibration_images = data_dir, calibration_images
        self.files = {key if isinstance(key, tuple) else (key, "torchscript"): path
                      for key, path in (onnx_files or {}).items()}
        self.made = {}

    @classmethod
    def of_model(cls, model, structure, workdir, test_set):
        """Sources for weights that are no checkpoint (the sweep's random models)."""
        import copy
        sources = cls(None, workdir, test_set)
        for routing in config.ROUTINGS:
            sources.made[("model", routing)] = copy.deepcopy(model)
            sources.made[("model", routing)].moe.routing = routing
        sources.made["structure"] = structure
        return sources

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def model(self, routing="dense"):
        return self.once(("model", routing), lambda: checkpoint.load_model(
            self.checkpoint_path, {"ROUTING": routing})[0])

    @property
    def structure(self):
        """The checkpoint's structure; an export's metadata where only exports were given."""
        def read():
            if self.files and not (self.checkpoint_path and os.path.exists(self.checkpoint_path)):
                return onnx_runtime.stored_structure(next(iter(self.files.values())))
            return checkpoint.load_model(self.checkpoint_path)[1]
        return self.once("structure", read)

    def scratch(self, name):
        return os.path.join(self.workdir, name)

    def onnx(self, routing="dense", exporter="torchscript"):
        if (routing, exporter) not in self.files:
            from ..export import write_checked
            import torch
            images, labels = self.test_set
            path = self.scratch(config.onnx_path(routing, exporter))
            write_checked(self.model(routing), {**self.structure, "ROUTING": routing}, path, exporter,
                          torch.from_numpy(images), torch.from_numpy(labels))
            self.files[(routing, exporter)] = path
        return self.files[(routing, exporter)]

    def fp16(self):
        return self.once("fp16", lambda: convert.fp16_copy(self.onnx(), self.scratch("fp16.onnx")))

    def calibration(self):
        from data import load_split
        return self.once("calibration", lambda: load_split("train", self.data_dir, self.calibration_images)[0].numpy())

    def int8(self, method="dynamic", per_channel=False, reduce_range=False, routing="dense"):
        key = ("int8", method, per_channel, reduce_range, routing)
        target = self.scratch(f"int8-{method.split()[0]}-{int(per_channel)}{int(reduce_range)}-{routing}.onnx")
        return self.once(key, lambda: convert.quantize(self.onnx(routing), target, method,
                                                       self.calibration() if method != "dynamic" else None,
                                                       per_channel, reduce_range))


@dataclass(frozen=True)
class Entry:
    name: str
    group: str  # torch, onnx, fp16, int8, openvino, gpu: the benchmark's colours and sections
    routing: str  # dense, loop or fused: which multiply-adds it does (the roofline needs it)
    precision: str  # fp32, bf16, fp16 or int8: which peak it is held to
    make: Callable[[Sources], Runner]
    quick: bool = False  # also in a smoke run

    def runner(self, sources):
        made = self.make(sources)
        made.name = self.name
        return made


def int8_name(method, per_channel, reduce_range):
    return (f"ONNX Runtime INT8 {method}, dense" + (", per-channel" if per_channel else "")
            + (", reduce-range" if reduce_range else ""))


def torch_entries(structure):
    entries = []
    for routing in config.ROUTINGS:
        def torch_runner(variant, routing=routing, kernel=None):
            return lambda s: pytorch.runner(variant, s.model(routing), {**s.structure, "ROUTING": routing},
                                            kernel=kernel)
        entries += [Entry(f"PyTorch eager CPU, {routing}", "torch", routing, "fp32", torch_runner("eager"),
                          quick=routing == "dense"),
                    Entry(f"PyTorch TorchScript (frozen) CPU, {routing}", "torch", routing, "fp32",
                          torch_runner("torchscript"), quick=routing == "dense")]
        if routing == "dense" and fused.takes(structure):
            entries += [Entry(fused.label(kernel), "int8", "fused", "int8", torch_runner("fused-int8", kernel=kernel),
                              quick=True) for kernel in fused.available_kernels()]
        entries.append(Entry(f"PyTorch torch.compile CPU, {routing}", "torch", routing, "fp32",
                             torch_runner("compile"), quick=routing == "dense"))
        if pytorch.has_bf16("cpu"):
            entries.append(Entry(f"PyTorch torch.compile CPU, bf16 autocast, {routing}", "torch", routing, "bf16",
                                 torch_runner("compile-bf16")))
    return entries


def onnx_entries():
    entries = [Entry(f"ONNX Runtime CPU, {routing}, {exporter}", "onnx", routing, "fp32",
                     lambda s, r=routing, e=exporter: onnx_runtime.runner(s.onnx(r, e)), quick=True)
               for routing in config.ROUTINGS for exporter in ("torchscript", "dynamo")]
    entries.append(Entry("ONNX Runtime FP16 on CPU, dense", "fp16", "dense", "fp32",
                         lambda s: onnx_runtime.runner(s.fp16(), precision="fp16 weights, fp32 compute"), quick=True))
    entries += [Entry(int8_name(*variant), "int8", "dense", "int8",
                      lambda s, v=variant: onnx_runtime.runner(s.int8(*v), precision="int8"),
                      quick=variant in INT8_VARIANTS[::3]) for variant in INT8_VARIANTS]
    entries += [Entry("ONNX Runtime CPU, auto (dense for small batches, loop for large)", "onnx", "loop", "fp32",
                      lambda s: onnx_runtime.auto_runner(s.onnx("dense"), s.onnx("loop"), config.AUTO_LOOP_FROM),
                      quick=True),
                Entry("ONNX Runtime INT8 dynamic, loop", "int8", "loop", "int8",
                      lambda s: onnx_runtime.runner(s.int8(routing="loop"), precision="int8"), quick=True)]
    return entries


def openvino_entries():
    precisions = ("f32", "bf16") if pytorch.has_bf16("cpu") else ("f32",)
    entries = []
    for routing in config.ROUTINGS:
        entries += [Entry(f"OpenVINO CPU {precision}, {routing}", "openvino", routing,
                          "fp32" if precision == "f32" else "bf16",
                          lambda s, r=routing, p=precision: openvino_cpu.runner(s.onnx(r), precision=p), quick=True)
                    for precision in precisions]
        entries.append(Entry(f"OpenVINO CPU INT8 (NNCF), {routing}", "openvino", routing, "int8",
                             lambda s, r=routing: openvino_cpu.runner(s.onnx(r), calibration=s.calibration()),
                             quick=True))
    return entries


def cpu_entries(structure):
    """(every CPU entry this machine has, [what it lacks, one line each])."""
    import onnxruntime as ort
    import torch
    entries = torch_entries(structure) + onnx_entries() + openvino_entries()
    lacking = [f"ONNX Runtime {label}: onnxruntime here has no {provider}" for provider, label in (
        ("CUDAExecutionProvider", "CUDA"), ("TensorrtExecutionProvider", "TensorRT"))
        if provider not in ort.get_available_providers()]
    if not torch.cuda.is_available():
        lacking.insert(0, "PyTorch CUDA: PyTorch sees no CUDA device")
    if not pytorch.has_bf16("cpu"):
        lacking.append("bf16 rows (torch.compile bf16 autocast, OpenVINO bf16): the CPU has no avx512_bf16/amx_bf16")
    lacking += [f"{fused.label(kernel)}: {why}" for kernel, why in fused.unavailable_kernels().items()]
    if not fused.takes(structure):
        lacking.append("PyTorch custom op, fused INT8: it needs EMB_SIZE and HIDDEN_SIZE multiples of 64 and at "
                       "most 16 experts")
    return entries, lacking + ["GPU rows: run benchmark.py --device cuda on a CUDA machine"]


def gpu_entries():
    """(every GPU entry this machine has, each timed from host arrays and device-resident, [what it
    lacks]). PyTorch's CUDA graph needs the dense routing."""
    import onnxruntime as ort
    import torch
    entries, lacking = [], []
    if torch.cuda.is_available():
        for routing in config.ROUTINGS:
            for variant in ("eager", "torchscript", "compile", "cuda-graph")[:4 if routing == "dense" else 3]:
                for timing in ("host", "resident"):
                    entries.append(Entry(f"PyTorch {pytorch.LABELS[variant]} CUDA, {routing}, {timing}", "torch",
                                         routing, "fp32", lambda s, r=routing, v=variant, t=timing:
                                         torch_gpu_runner(s, r, v, t)))
    else:
        lacking.append("PyTorch CUDA: PyTorch sees no CUDA device")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return entries, lacking + ["ONNX Runtime CUDA: onnxruntime here has no CUDAExecutionProvider"]
    files = {"ONNX Runtime CUDA, dense": (lambda s: s.onnx("dense"), CUDA, "fp32"),
             "ONNX Runtime CUDA, loop": (lambda s: s.onnx("loop"), CUDA, "fp32"),
             "ONNX Runtime FP16 on CUDA, dense": (lambda s: s.fp16(), CUDA, "fp16")}
    if "TensorrtExecutionProvider" in available:
        from ..tensorrt_support import shape_inferred_copy, tensorrt_options
        for fp16 in (False, True):
            options = lambda s, f=fp16: tensorrt_options(0, f, 1024, len(s.test_set[0]), s.scratch("trt_cache"))
            files[f"ONNX Runtime TensorRT{' fp16' if fp16 else ''}, dense"] = (
                lambda s: s.once("trt", lambda: shape_inferred_copy(s.onnx("dense"))),
                lambda s, o=options: [("TensorrtExecutionProvider", o(s))] + CUDA, "fp16" if fp16 else "fp32")
    else:
        lacking.append("ONNX Runtime TensorRT: onnxruntime here has no TensorrtExecutionProvider")
    for name, (path, providers, precision) in files.items():
        for timing in ("host", "resident"):
            entries.append(Entry(f"{name}, {timing}", "gpu", "loop" if "loop" in name else "dense", precision,
                                 lambda s, p=path, v=providers, t=timing, q=precision: onnx_gpu_runner(
                                     p(s), v(s) if callable(v) else v, t, q)))
    return entries, lacking


def torch_gpu_runner(sources, routing, variant, timing):
    import torch
    made = pytorch.runner(variant, sources.model(routing), {**sources.structure, "ROUTING": routing}, "cuda")
    return made.timed_by(pytorch.resident_clock(made.model, torch.device("cuda"))) if timing == "resident" else made


def onnx_gpu_runner(path, providers, timing, precision):
    made = onnx_runtime.runner(path, providers=providers, precision=precision)
    return made.timed_by(onnx_runtime.resident_clock(made.session, "cuda")) if timing == "resident" else made


def openvino_precision():
    """OpenVINO's fastest float precision on this CPU: bf16 where it has it."""
    return "bf16" if pytorch.has_bf16("cpu") else "f32"


def entry(name, entries):
    found = {e.name: e for e in entries}
    if name not in found:
        raise KeyError(f"no runner named {name!r}; there are: {', '.join(found)}")
    return found[name]
