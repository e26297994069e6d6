"""Tencent's ncnn as a runner: the ONNX file converted by pnnx into an ncnn model (cached), fp32, run
by ncnn's CPU layers one image at a time (ncnn has no batch dimension), on a chosen number of threads.

ncnn has no layers for the MoE gate: pnnx leaves TopK, ScatterElements and a pnnx.Expression (the k)
in the graph, which ncnn cannot load. The runner replaces those layers (and the Softmax between them)
with one custom layer, MoEGate, written against ncnn's Python API: top-k of the expert logits,
softmax of the chosen ones, scattered into the zeros the graph already holds. The rest of the graph
(the embedding, the gate's logits, the experts, the head) runs on ncnn's own layers."""
import os
import shutil
import subprocess
import tempfile

import numpy as np

from .. import contract
from ..cli import UserError, require_module
from . import compiled, onnx_runtime
from .base import Runner, plural

INSTALL = "pip install -r requirements.txt (ncnn and pnnx)"
GATE_LAYERS = ("pnnx.Expression", "TopK", "Softmax", "ScatterElements")  # what MoEGate stands in for
MAGIC = "7767517"  # the first line of every ncnn .param file


def ncnn():
    return require_module("ncnn", "ncnn", INSTALL)


def versions():
    from importlib.metadata import version
    return {"ncnn": version("ncnn"), "pnnx": version("pnnx"), "numpy": np.__version__}


def layer_lines(param_text):
    lines = param_text.strip().split("\n")
    if not lines or lines[0].strip() != MAGIC:
        raise UserError("not an ncnn .param file")
    return [line.split() for line in lines[2:]]


def with_gate_layer(param_text, top):
    """The .param text with the gate's TopK, Softmax, ScatterElements and pnnx.Expression replaced by
    one MoEGate layer (expert logits and the graph's zeros in, gates out), placed where the scatter
    was, so every blob it reads is made before it."""
    layers = layer_lines(param_text)
    types = [layer[0] for layer in layers]
    if "TopK" not in types or "ScatterElements" not in types:
        raise UserError("pnnx's graph has no TopK and ScatterElements: not this project's dense model")
    topk, scatter = layers[types.index("TopK")], layers[types.index("ScatterElements")]
    outputs = 4 + int(scatter[2])
    gate = ["MoEGate", "moe_gate", "2", "1", topk[4], scatter[4], scatter[outputs], f"0={top}"]
    at = sum(1 for layer in layers[:types.index("ScatterElements")] if layer[0] not in GATE_LAYERS)
    kept = [layer for layer in layers if layer[0] not in GATE_LAYERS]
    kept.insert(at, gate)
    blobs = {blob for layer in kept for blob in layer[4:4 + int(layer[2]) + int(layer[3])]}
    return "\n".join([MAGIC, f"{len(kept)} {len(blobs)}"] + [" ".join(layer) for layer in kept]) + "\n"


def missing_layers(param_text):
    """The layer types in the .param that this ncnn does not have (and no custom layer stands in for)."""
    return sorted({layer[0] for layer in layer_lines(param_text)
                   if layer[0] != "MoEGate" and ncnn().layer_to_index(layer[0]) < 0})


def convert(onnx_path, top):
    """A function that writes the ncnn model (.param and .bin, in one folder) to the path it is given;
    pnnx writes its side files in a scratch folder, never beside the user's model."""
    def write(target):
        pnnx = require_module("pnnx", "ncnn's converter (pnnx)", INSTALL)
        with tempfile.TemporaryDirectory() as scratch:
            model = os.path.join(scratch, "model.onnx")
            shutil.copyfile(onnx_path, model)
            done = subprocess.run([pnnx.EXEC_PATH, model, "inputshape=[1,1,28,28]f32", "fp16=0"], cwd=scratch, check=False,
                                  capture_output=True, text=True)
            param = os.path.join(scratch, "model.ncnn.param")
            if done.returncode or not os.path.exists(param):
                said = (done.stderr or done.stdout).strip().splitlines()
                raise UserError(f"pnnx could not convert {onnx_path}" + (f": {said[-1][:200]}" if said else ""))
            with open(param) as f:
                text = with_gate_layer(f.read(), top)
            missing = missing_layers(text)
            if missing:
                raise UserError(f"ncnn {versions()['ncnn']} has no layer for {', '.join(missing)} in {onnx_path}")
            weights = np.fromfile(os.path.join(scratch, "model.ncnn.bin"), np.uint8)
            with open(target, "wb") as f:  # one file: the cache's unit, written whole or not at all
                np.savez(f, param=np.array(text), weights=weights)
    return write


def gate_layer_class():
    class MoEGate(ncnn().Layer):
        """softmax over the top-k expert logits, scattered into zeros: what TopK, Softmax and
        ScatterElements do in the ONNX graph, for one image."""

        def __init__(self):
            ncnn().Layer.__init__(self)
            self.one_blob_only = False
            self.top = 1

        def load_param(self, param_dict):
            self.top = param_dict.get(0, 1)
            return 0

        def forward(self, bottom_blobs, top_blobs, opt):
            logits = np.array(bottom_blobs[0]).ravel()
            chosen = np.argsort(-logits, kind="stable")[:self.top]  # ties to the lower index, as TopK
            weights = np.exp(logits[chosen] - logits[chosen].max())
            gates = np.array(bottom_blobs[1]).ravel().copy()
            gates[chosen] = weights / weights.sum()
            top_blobs[0].clone_from(ncnn().Mat(gates), opt.blob_allocator)
            return 0
    return MoEGate


def load(path, threads):
    """(the ncnn Net with the gate layer registered, the gate layers it made) from the cached file."""
    with np.load(path, allow_pickle=False) as saved:
        text, weights = str(saved["param"]), saved["weights"]
    net, made = ncnn().Net(), []
    for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, name, False)  # fp32 throughout, as the other rows
    net.opt.num_threads = threads
    layer = gate_layer_class()
    net.register_custom_layer("MoEGate", lambda: made.append(layer()) or made[-1], lambda done: None)
    with tempfile.TemporaryDirectory() as scratch, compiled.quiet_output(f"loading {path} in ncnn"):
        param, model = os.path.join(scratch, "model.param"), os.path.join(scratch, "model.bin")
        with open(param, "w") as f:
            f.write(text)
        weights.tofile(model)
        if net.load_param(param) or net.load_model(model):
            raise UserError(f"{path} holds no ncnn model ncnn can load")
    return net, made


def runner(path, cache_dir=None, threads=1):
    """The ONNX file at path converted by pnnx (once; cached), the gate as a custom layer, run by ncnn
    one image at a time on `threads` threads. ncnn takes the dense graph."""
    if threads < 1:
        raise UserError(f"--threads {threads}: ncnn needs at least one thread")
    model = contract.check_onnx(path)
    if contract.is_loop_graph(model):
        raise UserError(f"{path} is the loop graph, which ncnn cannot run: pnnx leaves NonZero, Gather, ScatterND "
                        "and torch.gt in it, which ncnn has no layers for; use the dense graph, model.onnx")
    top = int(onnx_runtime.stored_structure(path)["TOP"])
    target = compiled.artifact_path("ncnn", path, f"pnnx fp16=0, MoEGate top {top}", ".npz", cache_dir)
    (net, layers), convert_s = compiled.loaded(target, convert(path, top), lambda p: load(p, threads),
                                               f"ncnn model of {path}")

    def predict(pixels):
        logits, gates = [], []
        for image in pixels:
            with net.create_extractor() as extractor:
                extractor.input("in0", ncnn().Mat(image[0]))
                logits.append(np.array(extractor.extract("out0")[1]).ravel())
                gates.append(np.array(extractor.extract("out1")[1]).ravel())
        return np.array(logits, np.float32).reshape(len(pixels), -1), np.array(gates, np.float32).reshape(len(pixels), -1)
    described = {"engine": f"ncnn {versions()['ncnn']}", "precision": "fp32",
                 "provider": "CPU layers, one image per call; the gate (top-k, softmax, scatter) as a Python custom "
                             "layer", "threads": threads,
                 "convert": "cached model, " + target if convert_s is None else f"{convert_s:.1f} s (pnnx), into {target}"}
    return Runner(f"ncnn {versions()['ncnn']} CPU ({plural(threads, 'thread')}, the gate as a custom layer)",
                  predict, described,
                  engine=(net, layers), versions=versions())
