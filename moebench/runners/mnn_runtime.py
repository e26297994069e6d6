"""Alibaba's MNN as a runner: the ONNX file converted once to an .mnn model (cached), run through MNN's
Module API on its CPU backend at high precision (fp32), with a chosen number of threads; optionally
with its weights stored as int8 (the converter's --weightQuantBits 8).

The converter is called through its C++ entry point (the `_tools` extension). MNN's `mnnconvert` and
`mnnquant` command lines are never run: their Python wrappers pip-install a logging SDK at run time
and send a usage record to Alibaba's servers."""
import numpy as np

from .. import contract
from ..cli import UserError, require_module
from . import compiled
from .base import Runner

INSTALL = "pip install -r requirements.txt (mnn)"


def mnn():
    """The MNN module, imported with its banner about this CPU's features kept off the terminal."""
    import sys
    if sys.modules.get("MNN") is None:
        with compiled.quiet_output("importing MNN"):
            require_module("MNN", "MNN", INSTALL)
    return sys.modules["MNN"]


def versions():
    return {"mnn": mnn().version(), "numpy": np.__version__}


def convert_flags(weight_bits):
    return ["-f", "ONNX", "--bizCode", "MNN"] + (["--weightQuantBits", str(weight_bits)] if weight_bits else [])


def build(onnx_path, weight_bits):
    def write(target):
        mnn()
        with compiled.quiet_output(f"MNN's converter on {onnx_path}"):
            tools = require_module("_tools", "MNN's converter", INSTALL)  # its C++ entry point, no logging wrapper
            tools.mnnconvert(["mnnconvert", *convert_flags(weight_bits), "--modelFile", onnx_path,
                              "--MNNModel", target])
    return write


def load(path, threads):
    """The .mnn model as an MNN Module with the model's input and outputs, on `threads` CPU threads."""
    with compiled.quiet_output(f"loading {path} in MNN"):
        manager = mnn().nn.create_runtime_manager(({"backend": "CPU", "numThread": threads, "precision": "high"},))
        module = mnn().nn.load_module_from_file(path, [contract.PIXELS], [contract.LOGITS, contract.GATES],
                                              runtime_manager=manager)
    if module is None:
        raise UserError(f"{path} is no MNN model MNN can load")
    with compiled.quiet_output(f"a first run of {path} in MNN"):  # where MNN prints its banner on this CPU
        expr = mnn().expr
        module.onForward([expr.const(np.zeros((1, 1, 28, 28), np.float32), (1, 1, 28, 28), expr.NCHW)])
    return module, manager


def runner(path, cache_dir=None, threads=1, weight_bits=0):
    """The ONNX file at path converted by MNN (once; cached) and run on `threads` threads. MNN takes
    both graphs, the dense and the loop one."""
    if threads < 1:
        raise UserError(f"--threads {threads}: MNN needs at least one thread")
    contract.check_onnx(path)
    expr = mnn().expr
    target = compiled.artifact_path("mnn", path, " ".join(convert_flags(weight_bits)), ".mnn", cache_dir)
    (module, manager), convert_s = compiled.loaded(target, build(path, weight_bits), lambda p: load(p, threads),
                                                   f"MNN model of {path}")

    def predict(pixels):
        logits, gates = module.onForward([expr.const(pixels, pixels.shape, expr.NCHW)])
        return np.array(logits.read()), np.array(gates.read())
    described = {"engine": f"MNN {versions()['mnn']}", "provider": "CPU backend, Module API",
                 "precision": "fp32" + (f" compute, int{weight_bits} weights" if weight_bits else ""),
                 "threads": threads,
                 "convert": "cached model, " + target if convert_s is None else f"{convert_s:.2f} s, into {target}"}
    return Runner(f"MNN CPU, {threads} thread{'s' if threads > 1 else ''}", predict, described,
                  engine=(module, manager), versions=versions())
