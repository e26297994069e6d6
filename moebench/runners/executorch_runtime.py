"""PyTorch's ExecuTorch as a runner: the PyTorch model exported (torch.export, a dynamic batch), its
weight-only arithmetic folded into constants, lowered with the XNNPACK partitioner into a .pte
program (cached), and run by ExecuTorch's runtime. What XNNPACK cannot take (the gate's top-k and
scatter) runs on ExecuTorch's portable kernels between the delegated parts."""
import numpy as np

from ..cli import UserError, require_module
from . import compiled
from .base import Runner, plural

INSTALL = "pip install -r requirements.txt (executorch)"
MAX_BATCH = 4096  # the exported batch's upper bound: ExecuTorch plans its memory for it; larger batches run in parts


def versions():
    from importlib.metadata import version
    return {"executorch": version("executorch"), "numpy": np.__version__}


def not_delegated(edge_program):
    """{operator: count} of what runs outside the XNNPACK delegate, on ExecuTorch's portable kernels."""
    counts = {}
    for node in edge_program.exported_program().graph_module.graph.nodes:
        name = str(node.target).split(".")[-2] if node.op == "call_function" and "aten" in str(node.target) else None
        if name and name not in ("view_copy", "sym_size"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def exported(model, calibration=None):
    """The model as torch.export gives it (a dynamic batch), its weight-only arithmetic folded into
    constants; with calibration images, quantized by XNNPACK's quantizer (int8 weights per channel,
    int8 activations, static scales from those images)."""
    import torch
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example, shapes = (torch.zeros(2, 1, 28, 28),), ({0: batch},)
    program = constant_prop_pass(torch.export.export(model.eval(), example, dynamic_shapes=shapes))
    if calibration is None:
        return program
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    observed = prepare_pt2e(program.module(), XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)))
    for start in range(0, len(calibration), 100):
        observed(torch.from_numpy(calibration[start:start + 100]))
    return torch.export.export(convert_pt2e(observed), example, dynamic_shapes=shapes)


def build(model, built, calibration=None):
    """A function that writes the lowered program to the path it is given; what stayed outside the
    delegate goes into built["not delegated"]."""
    def write(target):
        with compiled.quiet_output("exporting and lowering the model for ExecuTorch"):
            require_module("executorch", "ExecuTorch", INSTALL)
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower
            edge = to_edge_transform_and_lower(exported(model, calibration), partitioner=[XnnpackPartitioner()])
            program = edge.to_executorch()
        built["not delegated"] = not_delegated(edge)
        with open(target, "wb") as f:
            f.write(program.buffer)
    return write


def set_threads(threads):
    """ExecuTorch's one process-wide threadpool, which XNNPACK runs on: `threads` threads; returns its size."""
    with compiled.quiet_output("starting ExecuTorch's threadpool"):  # its CPU probe prints as the pool starts
        portable = require_module("executorch.extension.pybindings.portable_lib", "ExecuTorch", INSTALL)
        if threads and threads != portable._threadpool_get_thread_count():
            portable._unsafe_reset_threadpool(threads)
        return portable._threadpool_get_thread_count()


def load(path):
    with compiled.quiet_output(f"loading {path} in ExecuTorch"):
        runtime = require_module("executorch.runtime", "ExecuTorch", INSTALL).Runtime.get()
        return runtime.load_program(path).load_method("forward")


def runner(model, cache_dir=None, threads=0, calibration=None):
    """The PyTorch model (dense routing) lowered to ExecuTorch with XNNPACK (once; cached), run on
    `threads` threads (0: ExecuTorch's default, one per core); quantized to int8 first when
    calibration images (training images, never test images) are given."""
    import torch
    if getattr(model.moe, "routing", "dense") != "dense":
        raise UserError("ExecuTorch takes the dense routing only: the loop routing (rows per expert known only at "
                        "run time, torch.nonzero) exports and lowers, but its program fails to run (error 0x12)")
    built = {}
    settings = f"xnnpack, batch up to {MAX_BATCH}" + ("" if calibration is None else ", int8 static per channel, "
                                                    + compiled.digest(calibration))
    target = compiled.artifact_path("executorch", model, settings, ".pte", cache_dir)
    threads = set_threads(threads)  # before the program loads: XNNPACK takes the pool as it sets up
    method, build_s = compiled.loaded(target, build(model, built, calibration), load, "ExecuTorch program")

    def predict(pixels):
        parts = [method.execute([torch.from_numpy(pixels[i:i + MAX_BATCH])]) for i in range(0, len(pixels), MAX_BATCH)]
        return tuple(np.concatenate([part[k].numpy() for part in parts]) for k in range(2))
    outside = ", ".join(f"{name} x{count}" for name, count in built.get("not delegated", {}).items())
    precision = "fp32" if calibration is None else (f"int8 (XNNPACK quantizer: weights per channel, activations "
                                                    f"static, from {len(calibration)} training images)")
    described = {"engine": f"ExecuTorch {versions()['executorch']}", "precision": precision, "threads": threads,
                 "provider": "CPU, XNNPACK delegate; on portable kernels: " + (outside or "the gate's topk, full_like, "
                                                                                      "scatter (cached program)"),
                 "lower": (f"cached program, {target}" if build_s is None else f"{build_s:.1f} s, into {target}")}
    name = (f"ExecuTorch {versions()['executorch']} CPU (XNNPACK{'' if calibration is None else ', int8'}, "
            f"{plural(threads, 'thread')})")
    return Runner(name, predict, described,
                  engine=method, versions=versions())
