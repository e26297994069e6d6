"""Every runner this project has, under a stable key ("ort-dense", "fused-int8-vnni", ...): what
benchmark.py, sweep.py, loadgen.py and serve.py select from. An entry says what it is (label for
display, group, routing, precision), whether it runs here and why not, how it is timed, whether
serve.py can serve it, and makes its runner from Sources."""
from dataclasses import dataclass
from typing import Callable

import config

from .. import fused
from . import (executorch_runtime, iree_runtime, litert_runtime, mnn_runtime, ncnn_runtime, onnx_runtime, openvino_cpu,
               pytorch, tvm_compiler)
from .base import Runner
from .served import BACKENDS, Served
from .sources import Sources

REFERENCE = "ort-dense"  # fp32 ONNX Runtime on the dense graph: what the other rows are compared with
# sweep.py's panels (by batch, by model size, models larger than the caches) and loadgen.py in process
BATCH_SWEEP, SIZE_SWEEP, LARGE_SWEEP, LOADGEN = "batch sweep", "size sweep", "large-model sweep", "loadgen"
INT8_VARIANTS = (("dynamic", False, False), ("dynamic", True, False), ("dynamic", False, True),
                 ("static QDQ", False, False), ("static QDQ", True, False), ("static QDQ", False, True))
CUDA = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


def runs_anywhere(structure):
    return ""


def always():
    return True


@dataclass(frozen=True)
class Entry:
    key: str  # stable: what scripts, reports and tests select by
    label: str  # for display only
    group: str  # torch, onnx, fp16, int8, openvino, compiler, web, dataloader, gpu: the benchmark's colours
    routing: str  # dense, loop or fused: which multiply-adds it does (the roofline needs it)
    precision: str  # fp32, bf16, fp16 or int8: which peak it is held to
    make: Callable[[Sources], Runner] = None
    quick: bool = False  # also in a smoke run
    device: str = "cpu"
    timing: str = "host"  # which of the runner's clocks times it
    measured_by: str = "runner"  # runner; or browser, dataloader: rows benchmark.py measures its own way
    lacks: Callable[[dict], str] = runs_anywhere  # why it cannot run here ('' where it can)
    served: Served = None  # how serve.py serves it, if it can
    reports: tuple = ()  # the selections it is in besides the benchmark's: BATCH_SWEEP, SIZE_SWEEP, LOADGEN
    preferred: Callable[[], bool] = always  # False where a sibling entry of the same engine is this CPU's pick


def provider_missing(provider):
    def lacks(structure):
        import onnxruntime as ort
        return "" if provider in ort.get_available_providers() else f"onnxruntime here has no {provider}"
    return lacks


def torch_lacks(variant, device="cpu"):
    return lambda structure: pytorch.available(variant, device)


def no_bf16(structure):
    return "" if pytorch.has_bf16("cpu") else "the CPU has no avx512_bf16/amx_bf16"


def fused_lacks(kernel):
    def lacks(structure):
        if not fused.takes(structure):
            return f"it needs EMB_SIZE and HIDDEN_SIZE multiples of 64 and at most {fused.MAX_EXPERTS} experts"
        return fused.unavailable_kernels().get(kernel, "")
    return lacks


SERVE_ORT, SERVE_OPENVINO, SERVE_ORT_CUDA, SERVE_FUSED = (BACKENDS[b] for b in ("onnxruntime", "openvino",
                                                                          "onnxruntime-cuda", "fused-int8"))
TORCH_KEYS = {"eager": "eager", "torchscript": "script", "compile": "compile", "compile-bf16": "compile-bf16",
              "cuda-graph": "cuda-graph"}


def torch_runner(variant, routing, device="cpu", kernel=None):
    return lambda s: pytorch.runner(variant, s.model(routing), {**s.structure, "ROUTING": routing}, device, kernel=kernel)


def torch_entries():
    entries = []
    for routing in config.ROUTINGS:
        dense = routing == "dense"
        entries += [Entry(f"torch-eager-{routing}", f"PyTorch eager CPU, {routing}", "torch", routing, "fp32",
                          torch_runner("eager", routing), quick=dense),
                    Entry(f"torch-script-{routing}", f"PyTorch TorchScript (frozen) CPU, {routing}", "torch", routing,
                          "fp32", torch_runner("torchscript", routing), quick=dense,
                          reports=(LOADGEN,) if dense else ())]
        if dense:
            entries += [Entry(f"fused-int8-{kernel}", fused.label(kernel), "int8", "fused", "int8",
                              torch_runner("fused-int8", routing, kernel=kernel), quick=True, lacks=fused_lacks(kernel),
                              served=SERVE_FUSED, reports=(BATCH_SWEEP, LARGE_SWEEP),
                              preferred=lambda k=kernel: fused.chosen_kernel() == k) for kernel in fused.KERNELS]
        entries += [Entry(f"torch-compile-{routing}", f"PyTorch torch.compile CPU, {routing}", "torch", routing, "fp32",
                          torch_runner("compile", routing), quick=dense),
                    Entry(f"torch-compile-bf16-{routing}", f"PyTorch torch.compile CPU, bf16 autocast, {routing}",
                          "torch", routing, "bf16", torch_runner("compile-bf16", routing), lacks=torch_lacks("compile-bf16"))]
    return entries


def int8_key(method, per_channel, reduce_range):
    return (f"ort-int8-{method.split()[0]}" + ("-per-channel" if per_channel else "")
            + ("-reduce-range" if reduce_range else ""))


def int8_label(method, per_channel, reduce_range):
    return (f"ONNX Runtime INT8 {method}, dense" + (", per-channel" if per_channel else "")
            + (", reduce-range" if reduce_range else ""))


def onnx_entries():
    entries = [Entry(f"ort-{routing}{'-dynamo' if exporter == 'dynamo' else ''}",
                     f"ONNX Runtime CPU, {routing}, {exporter}", "onnx", routing, "fp32",
                     lambda s, r=routing, e=exporter: onnx_runtime.runner(s.onnx(r, e)), quick=True,
                     served=SERVE_ORT if (routing, exporter) == ("dense", "torchscript") else None,
                     reports=(BATCH_SWEEP, SIZE_SWEEP, LARGE_SWEEP, LOADGEN) if exporter == "torchscript" else ())
               for routing in config.ROUTINGS for exporter in ("torchscript", "dynamo")]
    entries.append(Entry("ort-fp16-dense", "ONNX Runtime FP16 on CPU, dense", "fp16", "dense", "fp32",
                         lambda s: onnx_runtime.runner(s.fp16(), precision="fp16 weights, fp32 compute"), quick=True))
    entries += [Entry(int8_key(*variant), int8_label(*variant), "int8", "dense", "int8",
                      lambda s, v=variant: onnx_runtime.runner(s.int8(*v), precision="int8"),
                      quick=variant in INT8_VARIANTS[::3],
                      reports=(BATCH_SWEEP, LARGE_SWEEP, LOADGEN) if variant == INT8_VARIANTS[0] else ())
                for variant in INT8_VARIANTS]
    entries += [Entry("ort-auto", "ONNX Runtime CPU, auto (dense for small batches, loop for large)", "onnx", "loop",
                      "fp32", lambda s: onnx_runtime.auto_runner(s.onnx("dense"), s.onnx("loop"), config.AUTO_LOOP_FROM),
                      quick=True),
                Entry("ort-int8-dynamic-loop", "ONNX Runtime INT8 dynamic, loop", "int8", "loop", "int8",
                      lambda s: onnx_runtime.runner(s.int8(routing="loop"), precision="int8"), quick=True,
                      reports=(BATCH_SWEEP, LARGE_SWEEP)),
                Entry("web-wasm-dense", "ONNX Runtime Web, WebAssembly, dense (headless Chromium)", "web", "dense",
                      "fp32", quick=True, measured_by="browser"),
                Entry("ort-loop-dataloader", "ONNX Runtime CPU, loop, fed by a per-image PIL Dataset and a "
                      "DataLoader (b=64)", "dataloader", "loop", "fp32", quick=True, measured_by="dataloader")]
    return entries


def openvino_entries():
    entries = []
    for routing in config.ROUTINGS:
        entries += [Entry(f"openvino-{precision}-{routing}", f"OpenVINO CPU {precision}, {routing}", "openvino",
                          routing, "fp32" if precision == "f32" else "bf16",
                          lambda s, r=routing, p=precision: openvino_cpu.runner(s.onnx(r), precision=p), quick=True,
                          lacks=no_bf16 if precision == "bf16" else runs_anywhere,
                          served=SERVE_OPENVINO if (routing, precision) == ("dense", "f32") else None,
                          reports=(BATCH_SWEEP, SIZE_SWEEP, LARGE_SWEEP) + ((LOADGEN,) if routing == "loop" else ()),
                          preferred=lambda p=precision: openvino_precision() == p)
                    for precision in ("f32", "bf16")]
        entries.append(Entry(f"openvino-int8-{routing}", f"OpenVINO CPU INT8 (NNCF), {routing}", "openvino", routing,
                             "int8", lambda s, r=routing: openvino_cpu.runner(s.onnx(r), calibration=s.calibration()),
                             quick=True, reports=(BATCH_SWEEP, LOADGEN) if routing == "loop" else ()))
    return entries


def gpu_entries():
    """Each GPU entry twice: timed from host arrays and device-resident. PyTorch's CUDA graph needs
    the dense routing."""
    entries = []
    for routing in config.ROUTINGS:
        for variant in ("eager", "torchscript", "compile", "cuda-graph")[:4 if routing == "dense" else 3]:
            entries += [Entry(f"torch-{TORCH_KEYS[variant]}-cuda-{routing}-{timing}",
                              f"PyTorch {pytorch.LABELS[variant]} CUDA, {routing}, {timing}", "torch", routing, "fp32",
                              torch_runner(variant, routing, "cuda"), device="cuda", timing=timing,
                              lacks=torch_lacks(variant, "cuda"))
                        for timing in ("host", "resident")]
    files = [("ort-cuda-dense", "ONNX Runtime CUDA, dense", lambda s: s.onnx("dense"), lambda s: CUDA, "fp32"),
             ("ort-cuda-loop", "ONNX Runtime CUDA, loop", lambda s: s.onnx("loop"), lambda s: CUDA, "fp32"),
             ("ort-fp16-cuda-dense", "ONNX Runtime FP16 on CUDA, dense", lambda s: s.fp16(), lambda s: CUDA, "fp16")]
    for fp16 in (False, True):
        files.append((f"ort-trt{'-fp16' if fp16 else ''}-dense", f"ONNX Runtime TensorRT{' fp16' if fp16 else ''}, dense",
                      trt_model, lambda s, f=fp16: [("TensorrtExecutionProvider", trt_options(s, f))] + CUDA,
                      "fp16" if fp16 else "fp32"))
    for key, label, path, providers, precision in files:
        provider = "TensorrtExecutionProvider" if "trt" in key else "CUDAExecutionProvider"
        entries += [Entry(f"{key}-{timing}", f"{label}, {timing}", "gpu", "loop" if "loop" in key else "dense",
                          precision, lambda s, p=path, v=providers, q=precision: onnx_runtime.runner(
                              p(s), providers=v(s), precision=q),
                          device="cuda", timing=timing, lacks=provider_missing(provider),
                          served=SERVE_ORT_CUDA if (key, timing) == ("ort-cuda-dense", "host") else None)
                    for timing in ("host", "resident")]
    return entries


def trt_model(sources):
    from ..tensorrt_support import shape_inferred_copy
    return sources.once("trt", lambda: shape_inferred_copy(sources.onnx("dense")))


def trt_options(sources, fp16):
    from ..tensorrt_support import tensorrt_options
    return tensorrt_options(0, fp16, 1024, len(sources.test_set[0]), sources.scratch("trt_cache"))


def module_missing(module, package, install="pip install -r requirements.txt"):
    def lacks(structure):
        import importlib.util
        return "" if importlib.util.find_spec(module) else f"{package} is not installed ({install})"
    return lacks


def compiler_entries():
    """The deep-learning compilers and mobile runtimes: TVM, IREE, MNN and ncnn from the ONNX file,
    LiteRT and ExecuTorch from the PyTorch model. TVM and MNN take the loop graph too."""
    cache = "compiled"
    entries = [Entry(f"tvm-{routing}", f"Apache TVM llvm, {routing}, untuned", "compiler", routing, "fp32",
                     lambda s, r=routing: tvm_compiler.runner(s.onnx(r), s.scratch(cache)), quick=routing == "dense",
                     lacks=module_missing("tvm", "apache-tvm")) for routing in config.ROUTINGS]
    entries += [Entry("iree-dense", "IREE llvm-cpu, dense (local-sync below batch 64, local-task from it)", "compiler",
                      "dense", "fp32", lambda s: iree_runtime.runner(s.onnx("dense"), s.scratch(cache)), quick=True,
                      lacks=module_missing("iree.runtime", "iree-base-runtime"))]
    for routing in config.ROUTINGS:
        entries += [Entry(f"mnn-{routing}-{threads}t", f"MNN CPU, {routing}, {threads} thread{'s' if threads > 1 else ''}",
                          "compiler", routing, "fp32", lambda s, r=routing, t=threads: mnn_runtime.runner(
                              s.onnx(r), s.scratch(cache), threads=t), quick=threads == 1,
                          lacks=module_missing("MNN", "mnn")) for threads in (1, 2)]
    entries += [Entry("mnn-dense-int8-weights", "MNN CPU, dense, int8 weights (fp32 compute), 1 thread", "compiler",
                      "dense", "fp32", lambda s: mnn_runtime.runner(s.onnx("dense"), s.scratch(cache), weight_bits=8),
                      lacks=module_missing("MNN", "mnn")),
                Entry("mnn-dense-int8", "MNN CPU INT8 (mnnquant), dense, 1 thread", "compiler", "dense", "int8",
                      lambda s: mnn_runtime.runner(s.onnx("dense"), s.scratch(cache), calibration=s.calibration()[:500]),
                      lacks=module_missing("MNN", "mnn")),
                Entry("ncnn-dense-1t", "ncnn CPU, dense, 1 thread, the gate as a custom layer", "compiler", "dense",
                      "fp32", lambda s: ncnn_runtime.runner(s.onnx("dense"), s.scratch(cache)), quick=True,
                      lacks=module_missing("ncnn", "ncnn")),
                Entry("litert-dense", "LiteRT XNNPACK, dense, one thread per core", "compiler", "dense", "fp32",
                      lambda s: litert_runtime.runner(s.model("dense"), s.scratch(cache)), quick=True,
                      lacks=module_missing("litert_torch", "litert-torch", litert_runtime.INSTALL_CONVERTER)),
                Entry("litert-dense-int8", "LiteRT XNNPACK INT8 (dynamic_wi8_afp32), dense, one thread per core",
                      "compiler", "dense", "int8", lambda s: litert_runtime.runner(s.model("dense"), s.scratch(cache),
                                                                                 int8=True),
                      lacks=module_missing("litert_torch", "litert-torch", litert_runtime.INSTALL_CONVERTER)),
                Entry("executorch-dense", "ExecuTorch XNNPACK, dense, one thread per core", "compiler", "dense", "fp32",
                      lambda s: executorch_runtime.runner(s.model("dense"), s.scratch(cache)), quick=True,
                      lacks=module_missing("executorch", "executorch")),
                Entry("executorch-dense-int8", "ExecuTorch XNNPACK INT8 (static, per channel), dense, one thread per "
                      "core", "compiler", "dense", "int8", lambda s: executorch_runtime.runner(
                          s.model("dense"), s.scratch(cache), calibration=s.calibration()),
                      lacks=module_missing("executorch", "executorch"))]
    return entries


def catalogue():
    """Every entry, whether or not this machine can run it."""
    return torch_entries() + onnx_entries() + openvino_entries() + compiler_entries() + gpu_entries()


def runnable(structure, device="cpu"):
    """(the entries of `device` this machine runs, [what it lacks: one line per reason, naming its rows])."""
    entries, lacking = [], {}
    for entry in catalogue():
        if entry.device != device:
            continue
        why = entry.lacks(structure)
        if why:
            lacking.setdefault(why, []).append(entry.label)
        else:
            entries.append(entry)
    lines = [f"{labels[0]}{f' and {len(labels) - 1} more' if len(labels) > 1 else ''}: {why}"
             for why, labels in lacking.items()]
    if device == "cpu":
        lines.append("GPU rows: run benchmark.py --device cuda on a CUDA machine")
    return entries, lines


def in_report(report, structure):
    """(the runnable entries `report` measures, one per engine where siblings differ only in what
    this CPU prefers (OpenVINO's float precision, the fused operator's path), in the catalogue's
    order; what this machine lacks for the others)."""
    wanted = [(e, e.lacks(structure)) for e in catalogue() if report in e.reports and e.device == "cpu"
              and e.preferred()]
    return [e for e, why in wanted if not why], [f"{e.label}: {why}" for e, why in wanted if why]


def openvino_precision():
    """OpenVINO's fastest float precision on this CPU: bf16 where it has it."""
    return "bf16" if pytorch.has_bf16("cpu") else "f32"


def entry(key, entries=None):
    found = {e.key: e for e in (catalogue() if entries is None else entries)}
    if key not in found:
        raise KeyError(f"no runner with the key {key!r}; there are: {', '.join(found)}")
    return found[key]
