"""IREE as a runner: the ONNX file imported to MLIR (iree-import-onnx), compiled ahead of time for this
host's CPU (llvm-cpu, --iree-llvmcpu-target-cpu=host) into a cached .vmfb module, and run by IREE's
runtime, with the synchronous driver (local-sync) for small batches and the task-parallel one
(local-task, a thread per core) for large ones, or one of them throughout."""
import os

import numpy as np

from .. import contract
from ..cli import UserError, require_module
from ..measuring.clock import Clock, by_batch_size
from . import compiled
from .base import Runner

DRIVERS = ("auto", "local-sync", "local-task")
SYNC_BELOW = 64  # auto: batches below this run on local-sync, larger ones on local-task
FUNCTION = "main_graph"  # the function iree-import-onnx makes of an ONNX graph
INSTALL = "pip install -r requirements.txt (iree-base-compiler and iree-base-runtime)"


def versions():
    from importlib.metadata import version
    return {"iree-base-compiler": version("iree-base-compiler"), "iree-base-runtime": version("iree-base-runtime"),
            "numpy": np.__version__}


def compile_flags(target_cpu):
    return ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
            f"--iree-llvmcpu-target-cpu={target_cpu}"]


def build(onnx_path, target_cpu):
    """A function that writes the compiled module to the path it is given."""
    def write(target):
        tools = require_module("iree.compiler.tools", "IREE", INSTALL)
        importer = require_module("iree.compiler.tools.import_onnx.__main__", "IREE's ONNX importer", INSTALL)
        mlir = target + ".mlir"
        try:
            with compiled.quiet_output(f"iree-import-onnx {onnx_path}"):
                importer.main(importer.parse_arguments([onnx_path, "-o", mlir]))
            with compiled.quiet_output(f"iree-compile of {onnx_path}"):
                tools.compile_file(mlir, output_file=target, extra_args=compile_flags(target_cpu))
        finally:
            if os.path.exists(mlir):
                os.remove(mlir)
    return write


def context(vmfb_path, driver):
    """(the module's main function, its context) on `driver`; the context must outlive the function."""
    runtime = require_module("iree.runtime", "IREE", INSTALL)
    instance_context = runtime.SystemContext(config=runtime.Config(driver))
    instance_context.add_vm_module(runtime.VmModule.mmap(instance_context.instance, vmfb_path))
    module = instance_context.modules.module
    if FUNCTION not in module.vm_module.function_names:
        raise UserError(f"{vmfb_path} has no {FUNCTION} function; delete it so it is compiled again")
    return module[FUNCTION], instance_context


def predictor(function):
    def predict(pixels):
        logits, gates = function(pixels)
        return logits.to_host(), gates.to_host()
    return predict


def runner(path, cache_dir=None, driver="auto", target_cpu="host"):
    """The ONNX file at path compiled by IREE (once; the module is cached) and run on `driver`
    (auto: local-sync below batch SYNC_BELOW, local-task from there). IREE takes the dense graph;
    the loop graph's experts that no image chose make empty tensors, which IREE's runtime refuses."""
    if driver not in DRIVERS:
        raise UserError(f"--driver {driver}: expected one of {', '.join(DRIVERS)}")
    if contract.is_loop_graph(contract.check_onnx(path)):
        raise UserError(f"{path} is the loop graph, which IREE cannot run (an expert no image chose gives an "
                        "empty tensor, which IREE's runtime refuses); use the dense graph, model.onnx")
    target = compiled.artifact_path("iree", path, " ".join(compile_flags(target_cpu)), ".vmfb", cache_dir)
    drivers = ("local-sync", "local-task") if driver == "auto" else (driver,)
    (handles, compile_s) = compiled.loaded(target, build(path, target_cpu),
                                           lambda vmfb: [context(vmfb, d) for d in drivers], f"IREE module of {path}")
    predicts = [predictor(function) for function, _ in handles]
    clocks = [Clock(lambda pixels, p=p: p(pixels)[0]) for p in predicts]

    def predict(pixels):
        return predicts[0 if len(pixels) < SYNC_BELOW or len(predicts) == 1 else 1](pixels)
    described = {"engine": f"IREE {versions()['iree-base-runtime']}", "precision": "fp32",
                 "provider": f"llvm-cpu ({target_cpu} CPU), " + (f"local-sync below batch {SYNC_BELOW}, local-task "
                                                                 "from it" if driver == "auto" else driver),
                 "threads": {"local-sync": "1 (local-sync)", "local-task": "one per core (local-task)"}.get(
                     driver, f"1 below batch {SYNC_BELOW}, one per core from it"),
                 "compile": "cached module, " + target if compile_s is None else f"{compile_s:.1f} s, into {target}"}
    host = clocks[0] if len(clocks) == 1 else by_batch_size(clocks[0], clocks[1], SYNC_BELOW)
    return Runner(f"IREE {versions()['iree-base-runtime']} ({driver} driver, llvm-cpu)", predict, described,
                  engine=handles, clocks={"host": host}, versions=versions())

