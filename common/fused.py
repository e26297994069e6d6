"""The optional fused path: the whole model in one PyTorch custom operator (common/fused_moe.cpp),
INT8 on CPUs with AVX-512 VNNI, only the chosen experts computed. Built on first use with PyTorch's
own extension builder (a C++ compiler and ninja); the portable ONNX graph stays the default, and the
tests hold this path to it (argmax agreement, accuracy)."""
import functools
import os

import numpy as np
import torch

from . import measure
from .cli import UserError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_moe.cpp")
NEEDS = ("avx512f", "avx512bw", "avx512_vnni")
LABEL = "PyTorch custom op: fused MoE, INT8 (AVX-512 VNNI)"


def missing_cpu_features():
    return [flag for flag in NEEDS if flag not in measure.cpu_flags()]


@functools.cache
def build():
    """Compile (or reuse the cached build of) the operator; returns its Python module, whose
    int8_forward is the pybind11 binding (it skips torch.ops' dispatcher, a large share of a batch-1
    call); torch.ops.moe_fused.int8_forward is registered too."""
    missing = missing_cpu_features()
    if missing:
        raise UserError(f"the fused INT8 kernel needs AVX-512 VNNI; this CPU lacks {', '.join(missing)}")
    from torch.utils.cpp_extension import load
    try:
        return load("moe_fused", [SOURCE], extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)
    except Exception as error:
        raise UserError(f"building the fused kernel failed ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[-1][:200]}); it needs a C++ compiler and ninja "
                        "(pip install -r requirements.txt)")


def quantize_columns(weight):
    """(int8 weight, float32 scale per column) of a (K, N) float matrix, symmetric."""
    scale = np.abs(weight).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def vnni_layout(quantized):
    """(K, N) int8 -> (K/4, N, 4): four consecutive k of one column side by side, as vpdpbusd reads them."""
    k, n = quantized.shape
    return np.ascontiguousarray(quantized.reshape(k // 4, 4, n).transpose(0, 2, 1))


def padded(matrix, width=16):
    out = np.zeros(matrix.shape[:-1] + (width,), np.float32)
    out[..., :matrix.shape[-1]] = matrix
    return out


def takes(structure):
    """Whether the kernel's tiling takes this structure."""
    return structure["EMB_SIZE"] % 64 == 0 and structure["HIDDEN_SIZE"] % 64 == 0 and structure["EXPERTS"] <= 16


@torch.no_grad()
def pack(model, structure):
    """The operator's tensors from a trained MoEClassifier: the normalisation folded into the
    embedding, the head folded into each expert's second layer (as export_onnx.py does)."""
    if not takes(structure):
        raise UserError("the fused kernel needs EMB_SIZE and HIDDEN_SIZE multiples of 64 and at most 16 experts")
    embed_w = (model.embed.weight / model.pixel_std).numpy().T  # (784, EMB)
    embed_b = (model.embed.bias - (model.pixel_mean / model.pixel_std) * model.embed.weight.sum(1)).numpy()
    embed_q, embed_scale = quantize_columns(embed_w)
    head_w, head_b = model.head.weight.numpy(), model.head.bias.numpy()
    fc1 = [quantize_columns(e.fc1.weight.numpy().T) for e in model.moe.experts]  # (EMB, HIDDEN) each
    tensors = {"embed_q": vnni_layout(embed_q), "embed_scale": embed_scale / 255.0, "embed_bias": embed_b,
               "gate_w": padded(model.moe.w_gate.numpy()),
               "fc1_q": np.stack([vnni_layout(q) for q, _ in fc1]), "fc1_scale": np.stack([s for _, s in fc1]),
               "fc1_bias": np.stack([e.fc1.bias.numpy() for e in model.moe.experts]),
               "fc2_w": np.stack([padded((head_w @ e.fc2.weight.numpy()).T) for e in model.moe.experts]),
               "fc2_b": np.stack([padded(head_w @ e.fc2.bias.numpy()) for e in model.moe.experts]),
               "head_bias": head_b}
    return [torch.from_numpy(np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype)) for name in (
        "embed_q", "embed_scale", "embed_bias", "gate_w", "fc1_q", "fc1_scale", "fc1_bias", "fc2_w", "fc2_b",
        "head_bias")]


class FusedInt8:
    """model(pixels tensor) -> (logits, gates), through the custom operator."""

    def __init__(self, model, structure):
        self.op = build().int8_forward
        self.tensors = [t.float() if t.dtype == torch.float64 else t for t in pack(model.eval(), structure)]
        self.top = structure["TOP"]

    def __call__(self, pixels):
        return self.op(pixels, self.tensors, self.top)


def predictor(fused):
    """predict(numpy float32 batch) -> numpy logits."""
    def predict(batch):
        return fused(torch.from_numpy(batch))[0].numpy()
    return predict
