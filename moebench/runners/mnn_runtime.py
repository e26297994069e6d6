"""Alibaba's MNN as a runner: the ONNX file converted once to an .mnn model (cached), run through MNN's
Module API on its CPU backend at high precision (fp32), with a chosen number of threads; optionally
with its weights stored as int8 (the converter's --weightQuantBits 8), or quantized to int8 weights
and activations by MNN's offline quantizer (mnnquant), calibrated on training images.

The converter is called through its C++ entry point (the `_tools` extension). MNN's `mnnconvert` and
`mnnquant` command lines are never run: their Python wrappers pip-install a logging SDK at run time
and send a usage record to Alibaba's servers."""
import os

import numpy as np

from .. import contract
from ..cli import UserError, require_module
from . import compiled
from .base import Runner, plural

INSTALL = "pip install -r requirements.txt (mnn)"
QUANTIZE_BY = "EMA"  # mnnquant's activation calibration: its default, KL, crashed on this model


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


def build(onnx_path, weight_bits, calibration=None):
    def write(target):
        mnn()
        with compiled.quiet_output(f"MNN's converter on {onnx_path}"):
            tools = require_module("_tools", "MNN's converter", INSTALL)  # its C++ entry point, no logging wrapper
            tools.mnnconvert(["mnnconvert", *convert_flags(weight_bits), "--modelFile", onnx_path,
                              "--MNNModel", target])
        if calibration is not None:
            quantize(target, calibration)
    return write


def quantize(path, calibration):
    """The .mnn model at path quantized in place by mnnquant (int8 weights and activations), its
    activation ranges from the calibration images, which mnnquant reads as image files."""
    import json
    import tempfile

    from PIL import Image
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, "images")
        os.makedirs(folder)
        for index, image in enumerate(calibration):
            Image.fromarray(np.round(image[0] * 255).astype(np.uint8), "L").save(os.path.join(folder, f"{index}.png"))
        settings = {"format": "GRAY", "mean": [0.0], "normal": [1 / 255], "width": 28, "height": 28,
                    "path": folder + "/", "used_image_num": len(calibration), "feature_quantize_method": QUANTIZE_BY,
                    "weight_quantize_method": "MAX_ABS"}
        with open(os.path.join(scratch, "quantize.json"), "w") as f:
            json.dump(settings, f)
        with compiled.quiet_output(f"mnnquant on {path}"):
            require_module("_tools", "MNN's quantizer", INSTALL).mnnquant(
                ["mnnquant", path, path + ".int8", os.path.join(scratch, "quantize.json")])
        os.replace(path + ".int8", path)


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


def runner(path, cache_dir=None, threads=1, weight_bits=0, calibration=None):
    """The ONNX file at path converted by MNN (once; cached) and run on `threads` threads; with
    calibration images (training images, never test images), quantized to int8 by mnnquant. MNN
    takes both graphs, the dense and the loop one."""
    if threads < 1:
        raise UserError(f"--threads {threads}: MNN needs at least one thread")
    if weight_bits and calibration is not None:
        raise UserError("--weight-bits 8 and --int8 exclude each other: --int8 quantizes the weights too")
    if contract.is_loop_graph(contract.check_onnx(path)) and calibration is not None:
        raise UserError(f"--int8 takes the dense graph only: mnnquant's int8 copy of the loop graph {path} answers "
                        "wrongly (10% accuracy on the test set, chance); use model.onnx")
    expr = mnn().expr
    settings = " ".join(convert_flags(weight_bits)) + ("" if calibration is None else
                                                       f" mnnquant {QUANTIZE_BY} {compiled.digest(calibration)}")
    target = compiled.artifact_path("mnn", path, settings, ".mnn", cache_dir)
    (module, manager), convert_s = compiled.loaded(target, build(path, weight_bits, calibration),
                                                   lambda p: load(p, threads), f"MNN model of {path}")

    def predict(pixels):
        logits, gates = module.onForward([expr.const(pixels, pixels.shape, expr.NCHW)])
        return np.array(logits.read()), np.array(gates.read())
    described = {"engine": f"MNN {versions()['mnn']}", "provider": "CPU backend, Module API",
                 "precision": (f"int8 (mnnquant: weights and activations, {QUANTIZE_BY} calibration on "
                               f"{len(calibration)} training images)" if calibration is not None else
                               "fp32" + (f" compute, int{weight_bits} weights" if weight_bits else "")),
                 "threads": threads,
                 "convert": "cached model, " + target if convert_s is None else f"{convert_s:.2f} s, into {target}"}
    name = (f"MNN {versions()['mnn']} CPU ({plural(threads, 'thread')}"
            + (f", int{weight_bits} weights" if weight_bits else "")
            + (", int8" if calibration is not None else "") + ")")
    return Runner(name, predict, described,
                  engine=(module, manager), versions=versions())
