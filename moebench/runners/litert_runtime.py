"""Google's LiteRT (formerly TensorFlow Lite) as a runner: the PyTorch model converted by litert-torch
into a .tflite file (cached) and run by LiteRT's interpreter with its default CPU delegate, XNNPACK.

LiteRT files have static shapes here (litert-torch's converter fails on a dynamic batch of this
model), so the runner converts one file per batch size it is given, before any clock starts (in
the clock's prepare), and keeps an interpreter for each."""
import os

import numpy as np

from ..cli import UserError, require_module
from ..measuring.clock import Clock
from . import compiled
from .base import Runner, plural

INSTALL = "pip install -r requirements.txt (ai-edge-litert, ai-edge-quantizer)"
INSTALL_CONVERTER = "pip install --no-deps -r requirements-nodeps.txt (litert-torch)"


def versions():
    from importlib.metadata import PackageNotFoundError, version

    def of(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"
    return {name: of(name) for name in ("ai-edge-litert", "litert-torch", "ai-edge-quantizer")} | {
        "numpy": np.__version__}


def dense_only(model):
    if getattr(model.moe, "routing", "dense") != "dense":
        raise UserError("LiteRT takes the dense routing only: litert-torch cannot convert the loop routing, whose "
                        "rows per expert depend on the data (torch.nonzero; its JAX lowering needs concrete shapes)")


def build(model, batch_size, int8=False):
    """A function that writes the model converted for batch_size images to the path it is given;
    int8: then quantized by AI Edge Quantizer's dynamic_wi8_afp32 recipe."""
    def write(target):
        import torch
        sample = torch.zeros(batch_size, 1, 28, 28)
        with compiled.quiet_output(f"litert-torch converting the model for batch {batch_size}"):
            converter = require_module("litert_torch", "LiteRT's PyTorch converter", INSTALL_CONVERTER)
            converter.convert(model.eval(), (sample,)).export(target)
        if int8:
            with compiled.quiet_output(f"AI Edge Quantizer on the model for batch {batch_size}"):
                edge_quantizer = require_module("ai_edge_quantizer.quantizer", "LiteRT's quantizer", INSTALL)
                recipes = require_module("ai_edge_quantizer.recipe", "LiteRT's quantizer", INSTALL)
                quantizer = edge_quantizer.Quantizer(target)
                quantizer.load_quantization_recipe(recipes.dynamic_wi8_afp32())
                quantizer.quantize().export_model(target, overwrite=True)
    return write


def interpreter(path, threads):
    lite = require_module("ai_edge_litert.interpreter", "LiteRT", INSTALL)
    with compiled.quiet_output(f"loading {path} in LiteRT"):
        loaded = lite.Interpreter(model_path=path, num_threads=threads)
        loaded.allocate_tensors()
    outputs = [detail["index"] for detail in loaded.get_output_details()]
    if len(outputs) != 2 or tuple(loaded.get_input_details()[0]["shape"][1:]) != (1, 28, 28):
        raise UserError(f"{path} is no LiteRT file of this model (it needs one input of (N, 1, 28, 28), two outputs)")
    return loaded, loaded.get_input_details()[0]["index"], outputs


class Interpreters:
    """One LiteRT interpreter per batch size, each from its own converted (and cached) file; what
    was converted is said in described["convert"]."""

    def __init__(self, model, threads, cache_dir, described, int8):
        self.model, self.threads, self.cache_dir, self.described, self.int8 = model, threads, cache_dir, described, int8
        self.by_size, self.converted, self.cached = {}, {}, []

    def of(self, batch_size):
        if batch_size not in self.by_size:
            settings = f"batch {batch_size}" + (", dynamic_wi8_afp32" if self.int8 else "")
            target = compiled.artifact_path("litert", self.model, settings, ".tflite", self.cache_dir)
            self.by_size[batch_size], seconds = compiled.loaded(
                target, build(self.model, batch_size, self.int8), lambda p: interpreter(p, self.threads),
                f"LiteRT file for batch {batch_size}")
            if seconds is None:
                self.cached.append(batch_size)
            else:
                self.converted[batch_size] = seconds
            self.described["convert"] = self.said(os.path.dirname(target))
        return self.by_size[batch_size]

    def said(self, folder):
        parts = [f"batch {size} in {seconds:.1f} s" for size, seconds in self.converted.items()]
        if self.cached:
            parts.append(f"batch {', '.join(map(str, self.cached))} cached")
        return f"litert-torch {versions()['litert-torch']}: {'; '.join(parts)}, in {folder}"

    def run(self, pixels):
        loaded, input_index, outputs = self.of(len(pixels))
        loaded.set_tensor(input_index, pixels)
        loaded.invoke()
        return loaded, outputs

    def predict(self, pixels):
        loaded, outputs = self.run(pixels)
        return loaded.get_tensor(outputs[0]), loaded.get_tensor(outputs[1])

    def logits(self, pixels):
        loaded, outputs = self.run(pixels)
        return loaded.get_tensor(outputs[0])


def runner(model, cache_dir=None, threads=0, int8=False):
    """The PyTorch model (dense routing) converted by litert-torch and run by LiteRT with XNNPACK on
    `threads` threads (0: one per core). int8: weights stored as int8 and activations quantized
    per call (AI Edge Quantizer's dynamic_wi8_afp32 recipe; XNNPACK then multiplies in int8)."""
    dense_only(model)
    require_module("ai_edge_litert.interpreter", "LiteRT", INSTALL)
    threads = threads or os.cpu_count()
    precision = "int8 (int8 weights, activations quantized per call: dynamic_wi8_afp32)" if int8 else "fp32"
    described = {"engine": f"LiteRT {versions()['ai-edge-litert']}", "precision": precision,
                 "provider": "CPU, XNNPACK delegate, a static-shape file per batch size", "threads": threads}
    interpreters = Interpreters(model, threads, cache_dir, described, int8)
    interpreters.of(1)
    clock = Clock(interpreters.logits, prepare=lambda batch: (interpreters.of(len(batch)), batch)[1])
    name = f"LiteRT {versions()['ai-edge-litert']} CPU (XNNPACK{', int8' if int8 else ''}, {plural(threads, 'thread')})"
    return Runner(name, interpreters.predict, described,
                  engine=interpreters, logits=interpreters.logits, clocks={"host": clock}, versions=versions())
