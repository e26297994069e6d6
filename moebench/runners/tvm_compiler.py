"""Apache TVM as a runner: the ONNX file imported into Relax, compiled by TVM's CPU pipeline for this
host's CPU (LLVM, -mcpu of the machine that compiles) into a shared library (cached), and run by
Relax's virtual machine. Untuned, one library takes every batch size. Tuned, MetaSchedule searches
schedules for two static shapes, batch 1 and one bulk batch size; larger batches run in parts of
the bulk size, the last one padded. Records and libraries stay in the cache: the search is paid once."""
import os

import numpy as np

from .. import contract
from ..cli import UserError, require_module
from ..measuring.clock import Clock
from . import compiled
from .base import Runner

INSTALL = "pip install -r requirements.txt (apache-tvm, apache-tvm-ffi)"


def tvm():
    with compiled.quiet_output("importing TVM"):
        module = require_module("tvm", "TVM", INSTALL)
        require_module("tvm.relax.frontend.onnx", "TVM's ONNX importer", INSTALL)
        require_module("tvm.tirx", "TVM", INSTALL)
    return module


def versions():
    from importlib.metadata import version
    return {"apache-tvm": version("apache-tvm"), "apache-tvm-ffi": version("apache-tvm-ffi"), "numpy": np.__version__}


def host_cpu():
    """LLVM's name for this machine's CPU (what -mcpu=native would pick)."""
    from tvm.target import codegen
    return str(tvm() and codegen.llvm_get_system_cpu())


def target_of(cpu):
    return tvm().target.Target({"kind": "llvm", "mcpu": host_cpu() if cpu == "host" else cpu,
                                "num-cores": os.cpu_count()})


def imported(onnx_path, batch):
    """The ONNX graph as a Relax module: batch an int (static) or None (a symbolic batch)."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    size = tvm().tirx.Var("batch", "int64") if batch is None else batch
    module = from_onnx(onnx.load(onnx_path), shape_dict={contract.PIXELS: [size, 1, 28, 28]})
    return relax.transform.DecomposeOpsForInference()(module)


def tuned(module, target, trials, work_dir):
    """The module with MetaSchedule's best schedules from `trials` trials (records in work_dir, reused)."""
    from tvm import relax, transform
    with target, transform.PassContext(opt_level=3):
        passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                  relax.transform.FuseOps(), relax.transform.FuseTIR(),
                  relax.transform.MetaScheduleTuneTIR(work_dir, trials),
                  relax.transform.MetaScheduleApplyDatabase(work_dir)]
        return transform.Sequential(passes)(module)


def build(onnx_path, cpu, batch, trials, work_dir):
    """A function that writes the compiled library to the path it is given."""
    def write(target_path):
        from tvm import relax
        with compiled.quiet_output(f"TVM compiling {onnx_path}" + (f" for batch {batch}" if batch else "")):
            target = target_of(cpu)
            module = imported(onnx_path, batch)
            if trials:
                module = tuned(module, target, trials, work_dir)
            relax.build(module, target=target).export_library(target_path)
    return write


def load(path):
    from tvm import relax
    with compiled.quiet_output(f"loading {path} in TVM"):
        return relax.VirtualMachine(tvm().runtime.load_module(path), tvm().cpu())["main"]


class Libraries:
    """TVM's compiled libraries: one for every batch size untuned; tuned, one for batch 1 and one for
    `bulk` images, which every other batch runs through in parts (the last padded with zeros)."""

    def __init__(self, onnx_path, cache_dir, cpu, trials, bulk, described):
        self.onnx_path, self.cache_dir, self.cpu, self.trials, self.bulk = onnx_path, cache_dir, cpu, trials, bulk
        self.described, self.by_size, self.built = described, {}, {}

    def of(self, batch_size):
        key = (1 if batch_size == 1 else self.bulk) if self.trials else None
        if key not in self.by_size:
            settings = f"llvm {self.cpu}, {self.trials} trials" + (f", batch {key}" if key else "")
            path = compiled.artifact_path("tvm", self.onnx_path, settings, ".so", self.cache_dir)
            work_dir = path[:-3] + ".tuning"
            self.by_size[key], seconds = compiled.loaded(path, build(self.onnx_path, self.cpu, key, self.trials,
                                                                     work_dir), load, f"TVM library of {self.onnx_path}")
            self.built[key] = "cached" if seconds is None else f"{seconds:.1f} s"
            self.described["compile"] = self.said(os.path.dirname(path))
        return self.by_size[key]

    def said(self, folder):
        if not self.trials:
            return f"{self.built[None]} (untuned: TVM's default CPU schedules), in {folder}"
        each = "; ".join(f"batch {size}: {took}" for size, took in self.built.items())
        return (f"MetaSchedule, {self.trials} trials per function ({each}; other batches in parts of "
                f"{self.bulk}, the last padded), in {folder}")

    def predict(self, pixels):
        if not self.trials or len(pixels) in (1, self.bulk):
            logits, gates = self.of(len(pixels))(tvm().runtime.tensor(pixels))
            return logits.numpy(), gates.numpy()
        parts = [self.padded(pixels[start:start + self.bulk]) for start in range(0, len(pixels), self.bulk)]
        return tuple(np.concatenate([part[k] for part in parts]) for k in range(2))

    def padded(self, part):
        whole = np.zeros((self.bulk, *part.shape[1:]), np.float32)
        whole[:len(part)] = part
        logits, gates = self.of(self.bulk)(tvm().runtime.tensor(whole))
        return logits.numpy()[:len(part)], gates.numpy()[:len(part)]


def runner(path, cache_dir=None, cpu="host", tune_trials=0, tune_batch=64):
    """The ONNX file at path compiled by TVM (once; cached), untuned or tuned by MetaSchedule with
    `tune_trials` trials per function for batch 1 and batch `tune_batch`. Untuned, TVM takes both
    graphs; tuned, the dense one."""
    if tune_trials < 0 or tune_batch < 1:
        raise UserError(f"--tune-trials {tune_trials}, batch {tune_batch}: trials must be 0 (untuned) or more, "
                        "the batch at least 1")
    if contract.is_loop_graph(contract.check_onnx(path)) and tune_trials:
        raise UserError(f"--tune-trials tunes the dense graph only (MetaSchedule here tunes static shapes, and the "
                        f"loop graph {path} has expert batches known only at run time); use model.onnx, or no tuning")
    described = {"engine": f"Apache TVM {versions()['apache-tvm']}", "precision": "fp32",
                 "provider": f"llvm, -mcpu={host_cpu() if cpu == 'host' else cpu}, Relax VM",
                 "threads": f"{os.cpu_count()} (TVM's thread pool)"}
    libraries = Libraries(path, cache_dir, cpu, tune_trials, tune_batch, described)
    libraries.of(1)
    clock = Clock(lambda pixels: libraries.predict(pixels)[0],
                  prepare=lambda batch: (libraries.of(len(batch)), batch)[1])
    tuning = f"MetaSchedule, {tune_trials} trials" if tune_trials else "untuned"
    return Runner(f"Apache TVM {versions()['apache-tvm']} (llvm, {tuning})", libraries.predict, described,
                  engine=libraries, clocks={"host": clock}, versions=versions())
