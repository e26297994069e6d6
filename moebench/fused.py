"""The fused path: the whole model in one PyTorch custom operator (moebench/fused_operator/), INT8, only
the chosen experts computed. One C++ source, four builds, the best one for this CPU picked at run
time: `amx` (AMX tiles, Intel since Sapphire Rapids), `vnni` (AVX-512 VNNI), `avx2` (AVX2 and FMA) or
`portable` (plain C++, any CPU, ARM included); MOE_FUSED_KERNEL=amx|vnni|avx2|portable forces one.
Built on first use with PyTorch's own extension builder (a C++ compiler and ninja), once per path,
and cached; the portable ONNX graph stays the default, and the tests hold every path to it (argmax
agreement, accuracy)."""
import functools
import os
import platform
import shutil
import time

import numpy as np
import torch

from .measuring.machine import cpu_flags
from .cli import UserError, atomic_path, error_line

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_operator")
SOURCE = os.path.join(FOLDER, "fused_moe.cpp")  # it includes the folder's headers
ENV = "MOE_FUSED_KERNEL"
# path -> (the CPU flags it needs, as /proc/cpuinfo names them; compiler flags; its name in reports)
VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"]
KERNELS = {"amx": (("avx512f", "avx512bw", "avx512_vnni", "fma", "amx_tile", "amx_int8"),
                   VNNI_FLAGS + ["-mamx-tile", "-mamx-int8"], "AMX"),
           "vnni": (("avx512f", "avx512bw", "avx512_vnni", "fma"), VNNI_FLAGS, "AVX-512 VNNI"),
           "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"], "AVX2"),
           "portable": ((), [], "portable C++")}
# the product instruction each path's own limit is measured with (AMX's batches under 16 rows run on vpdpbusd)
PRODUCT_INSTRUCTION = {"amx": "tdpbusd", "vnni": "vpdpbusd", "avx2": "vpmaddwd + vpaddd"}
LOCK_STALE_S = 300  # a build takes well under a minute; an older lock was left by a killed build


def x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686")


def missing_cpu_features(kernel):
    """The CPU flags this machine lacks for `kernel` (on a CPU that is not x86, every x86 path lacks all)."""
    needs = KERNELS[kernel][0]
    return list(needs) if needs and not x86() else [flag for flag in needs if flag not in cpu_flags()]


def available_kernels():
    return [kernel for kernel in KERNELS if not missing_cpu_features(kernel)]


def unavailable_kernels():
    """{path: why it cannot run here}, for reports."""
    return {kernel: f"this CPU lacks {', '.join(missing_cpu_features(kernel))}"
            for kernel in KERNELS if missing_cpu_features(kernel)}


def chosen_kernel():
    """MOE_FUSED_KERNEL if set, else the fastest path this CPU has."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in KERNELS:
            raise UserError(f"{ENV}={forced}: expected one of {', '.join(KERNELS)}")
        if missing_cpu_features(forced):
            raise UserError(f"{ENV}={forced}: {unavailable_kernels()[forced]}; choose one of "
                            f"{', '.join(available_kernels())}")
        return forced
    return available_kernels()[0]


def describe(kernel):
    """What ran, for a report's block."""
    why = f"forced by {ENV}" if os.environ.get(ENV) else "the fastest this CPU has"
    products = {"amx": "tdpbusd on 16-row tiles from 16 rows up, vpdpbusd below", "vnni": "vpdpbusd",
                "avx2": "vpmaddwd on int16-widened bytes", "portable": "plain C++ loops"}[kernel]
    unavailable = "; ".join(f"{k} not available: {why_not}" for k, why_not in unavailable_kernels().items())
    return (f"{kernel} path of moebench/fused_operator ({why}): uint8 x int8 products for the embedding and both "
            f"layers of each expert ({products}), gate and top-k in float32, only the chosen experts"
            + (f"; {unavailable}" if unavailable else ""))


def label(kernel):
    return f"PyTorch custom op: fused MoE, INT8 ({KERNELS[kernel][2]})"


def build_directory(name):
    """Where PyTorch builds extensions (TORCH_EXTENSIONS_DIR, else its cache folder), one folder per
    path and PyTorch version."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    folder = os.path.join(root, f"{name}-torch{torch.__version__}")
    os.makedirs(folder, exist_ok=True)
    return folder


def clear_stale_lock(folder, poll_s=1.0):
    """PyTorch's loader waits forever on the lock file of a build, also on one that a killed build left
    (and it takes the lock even where the build is cached). So wait here while another build may still
    be running, and take over a lock older than a build ever takes."""
    lock = os.path.join(folder, "lock")
    announced = False
    while os.path.exists(lock):
        age = time.time() - os.path.getmtime(lock)
        if age >= LOCK_STALE_S:
            os.remove(lock)
            print(f"removed a stale lock left by an interrupted build of the fused operator ({lock}, "
                  f"{age:.0f} s old)", flush=True)
            return
        if not announced:
            print(f"waiting for another build of the fused operator ({lock}, {age:.0f} s old; taken over once "
                  f"{LOCK_STALE_S} s old) ...", flush=True)
            announced = True
        time.sleep(poll_s)


def require_toolchain():
    from torch.utils.cpp_extension import is_ninja_available
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise UserError(f"the fused operator is compiled on first use and needs a C++ compiler ({compiler} is not "
                        "on the PATH): apt-get install g++ (or set CXX)")
    if not is_ninja_available():
        raise UserError("the fused operator is compiled on first use with ninja, which is not installed: "
                        "pip install -r requirements.txt")


def read_bytes(path):
    """The file's bytes, or None where there is no file."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def source_files():
    return sorted(name for name in os.listdir(FOLDER) if name.endswith((".cpp", ".h")))


def source_bytes():
    """The operator's source and headers, what a cached build must have been built from."""
    return b"".join(read_bytes(os.path.join(FOLDER, name)) for name in source_files())


def staged_source(folder):
    """The operator's files copied into the build folder, the copy that is compiled: PyTorch's loader
    rebuilds whenever the source's path changes, so compiling the repository's own file would make
    every other copy of the repository (a second checkout, the tests' copy) rebuild the same source."""
    staged = os.path.join(folder, "source")
    os.makedirs(staged, exist_ok=True)
    for name in source_files():
        content = read_bytes(os.path.join(FOLDER, name))
        if read_bytes(os.path.join(staged, name)) != content:
            with atomic_path(os.path.join(staged, name)) as tmp, open(tmp, "wb") as f:
                f.write(content)
    return os.path.join(staged, os.path.basename(SOURCE))


@functools.cache
def build(kernel=None):
    """Compile (or reuse the cached build of) one path of the operator; returns its Python module,
    whose int8_forward is the pybind11 binding (it skips torch.ops' dispatcher, a large share of a
    batch-1 call); torch.ops.moe_fused_<path>.int8_forward is registered too."""
    kernel = kernel or chosen_kernel()
    if missing_cpu_features(kernel):
        raise UserError(f"the fused operator's {kernel} path cannot run here: {unavailable_kernels()[kernel]}")
    from torch.utils.cpp_extension import load
    name = f"moe_fused_{kernel}"
    folder = build_directory(name)
    built_from = os.path.join(folder, "built-from.cpp")  # the source of the build in the folder
    source = source_bytes()
    cached = os.path.exists(os.path.join(folder, f"{name}.so")) and read_bytes(built_from) == source
    clear_stale_lock(folder)
    if not cached:
        require_toolchain()
        print(f"building the fused INT8 operator, {kernel} path, into {folder} (once; 20-60 s) ...", flush=True)
    started = time.perf_counter()
    try:
        # -fopenmp compiles at::parallel_for's OpenMP loops; nothing links an OpenMP runtime of its own,
        # so they run on PyTorch's, which torch.set_num_threads() sets
        module = load(name, [staged_source(folder)], extra_cflags=["-O3", "-fopenmp", *KERNELS[kernel][1]], build_directory=folder,
                      is_python_module=True, verbose=False)
    except Exception as error:
        log = os.path.join(folder, "build-error.log")
        with atomic_path(log) as tmp, open(tmp, "w") as f:
            f.write(str(error))
        raise UserError(f"building the fused operator's {kernel} path failed ({error_line(error, last=True)}); "
                        f"the compiler's full output is in {log}")
    if not cached:
        if os.path.exists(os.path.join(folder, "build-error.log")):  # an earlier failure's, no longer true
            os.remove(os.path.join(folder, "build-error.log"))
        with atomic_path(built_from) as tmp, open(tmp, "wb") as f:
            f.write(source)
        print(f"built the fused INT8 operator, {kernel} path, in {time.perf_counter() - started:.0f} s", flush=True)
    return module


def quantize_columns(weight):
    """(int8 weight, float32 scale per column) of a (K, N) float matrix, symmetric."""
    scale = np.abs(weight).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


# path -> (k values of one column stored side by side, the integer type they are stored in): what
# the path's product instruction reads (vpdpbusd: 4 int8; vpmaddwd: 2 int16; plain loops: rows)
LAYOUTS = {"amx": (4, np.int8), "vnni": (4, np.int8), "avx2": (2, np.int16), "portable": (1, np.int8)}
MAX_EXPERTS = 256  # fused_moe.cpp's MAX_EXPERTS
PADDED_PIXELS = {"amx": 832}  # AMX multiplies k in chunks of 64: the embedding's weights get zero rows


def packed_layout(quantized, kernel):
    """(K, N) int8 values -> (K/KPACK, N, KPACK) in the path's integer type."""
    k_pack, dtype = LAYOUTS[kernel]
    k, n = quantized.shape
    return np.ascontiguousarray(quantized.reshape(k // k_pack, k_pack, n).transpose(0, 2, 1), dtype=dtype)


def takes(structure):
    """Whether the kernel's tiling takes this structure."""
    return structure["EMB_SIZE"] % 64 == 0 and structure["HIDDEN_SIZE"] % 64 == 0 and structure["EXPERTS"] <= MAX_EXPERTS


@torch.no_grad()
def pack(model, structure, kernel):
    """The operator's tensors from a trained MoEClassifier for one path: the normalisation folded
    into the embedding, the head folded into each expert's second layer (as export_onnx.py does);
    the same int8 values on every path, laid out as its product instruction reads them."""
    if not takes(structure):
        raise UserError(f"the fused kernel needs EMB_SIZE and HIDDEN_SIZE multiples of 64 and at most {MAX_EXPERTS} experts")
    embed_w = (model.embed.weight / model.pixel_std).numpy().T  # (784, EMB)
    embed_b = (model.embed.bias - (model.pixel_mean / model.pixel_std) * model.embed.weight.sum(1)).numpy()
    embed_q, embed_scale = quantize_columns(embed_w)
    embed_q = np.pad(embed_q, ((0, PADDED_PIXELS.get(kernel, 784) - 784), (0, 0)))
    head_w, head_b = model.head.weight.numpy(), model.head.bias.numpy()
    fc1 = [quantize_columns(e.fc1.weight.numpy().T) for e in model.moe.experts]  # (EMB, HIDDEN) each
    # the head folded into each expert's second layer, (HIDDEN, CLASSES), its columns padded to 16 with zeros
    fc2 = [quantize_columns(np.pad((head_w @ e.fc2.weight.numpy()).T, ((0, 0), (0, 16 - len(head_b)))))
           for e in model.moe.experts]
    tensors = {"embed_q": packed_layout(embed_q, kernel), "embed_scale": embed_scale / 255.0, "embed_bias": embed_b,
               "gate_w": model.moe.w_gate.numpy(),
               "fc1_q": np.stack([packed_layout(q, kernel) for q, _ in fc1]),
               "fc1_scale": np.stack([s for _, s in fc1]),
               "fc1_bias": np.stack([e.fc1.bias.numpy() for e in model.moe.experts]),
               "fc2_q": np.stack([packed_layout(q, kernel) for q, _ in fc2]),
               "fc2_scale": np.stack([s for _, s in fc2]),
               "fc2_b": np.stack([head_w @ e.fc2.bias.numpy() for e in model.moe.experts]),
               "head_bias": head_b}
    return [torch.from_numpy(np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype)) for name in (
        "embed_q", "embed_scale", "embed_bias", "gate_w", "fc1_q", "fc1_scale", "fc1_bias", "fc2_q", "fc2_scale",
        "fc2_b", "head_bias")]


class FusedInt8:
    """model(pixels tensor) -> (logits, gates), through the custom operator; `kernel` names the path
    (default: chosen_kernel()). numpy(pixels array) answers numpy arrays through the operator with its
    weights held once; logits(pixels) the logits alone, the leanest call (what a benchmark or a server
    calls per batch); profile(pixels) says where a call's time goes; instruction_peaks(seconds) what
    the path's product instructions do alone."""

    def __init__(self, model, structure, kernel=None):
        self.kernel = kernel or chosen_kernel()
        module = build(self.kernel)
        self.op = module.int8_forward
        packed = pack(model.eval(), structure, self.kernel)
        self.tensors = [t.float() if t.dtype == torch.float64 else t for t in packed]
        self.top = structure["TOP"]
        self.prepared = module.Prepared(self.tensors, self.top)
        self.numpy = self.prepared.numpy
        self.logits = self.prepared.logits_function()  # numpy pixels -> numpy logits, the leanest call
        self.phases = list(module.phases)
        self.instruction_peaks = module.instruction_peaks

    def __call__(self, pixels):
        return self.op(pixels, self.tensors, self.top)

    def profile(self, pixels, repeats=5):
        """{phase: [seconds per thread]} of one call on float32 pixels (numpy), the median of `repeats`
        calls after one unmeasured."""
        self.prepared.profile(pixels)
        tables = np.array([self.prepared.profile(pixels) for _ in range(repeats)])  # (repeats, threads, phases)
        median = np.median(tables, axis=0)
        return {phase: median[:, i].tolist() for i, phase in enumerate(self.phases)}


def predictor(fused):
    """predict(numpy float32 batch) -> numpy logits."""
    return fused.logits
