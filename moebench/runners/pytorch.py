"""PyTorch as a runner: eager, frozen TorchScript, torch.compile (fp32, bf16 autocast), the fused
INT8 custom operator on the CPU, and on CUDA a CUDA-graph replay; timed from host arrays, and on
CUDA also device-resident."""
import torch

from .. import fused
from ..measuring.clock import Clock
from ..measuring.machine import cpu_flags
from ..cli import UserError
from .base import Runner


def pick_device(choice):
    """torch.device for --device auto, cpu or cuda; cuda where PyTorch sees none is one line."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device; install a CUDA build of torch "
                        "(requirements-gpu.txt) on a CUDA machine, or use --device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


VARIANTS = ("eager", "torchscript", "compile", "compile-bf16", "fused-int8", "cuda-graph")
LABELS = {"eager": "eager", "torchscript": "TorchScript (frozen)", "compile": "torch.compile (inductor)",
          "compile-bf16": "torch.compile (inductor), bf16 autocast", "cuda-graph": "eager, CUDA graph replay",
          "fused-int8": "custom op: fused MoE, INT8"}


def forward_logits(model, device, bf16=False):
    def forward(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x)[0]
    return forward


def predictor(model, device, bf16=False):
    """predict(numpy batch) -> numpy logits: what a user calling the model from host arrays gets."""
    forward = forward_logits(model, torch.device(device), bf16)

    def predict(batch):
        return forward(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    return predict


def resident_clock(model, device, bf16=False):
    """Inputs already on the device before the clock starts; the clock stops after synchronising."""
    forward = forward_logits(model, device, bf16)
    return Clock(forward, prepare=lambda batch: torch.from_numpy(batch).to(device),
                 sync=torch.cuda.synchronize, fetch=lambda logits: logits.float().cpu().numpy(),
                 timing=f"device-resident: torch tensors already on {device}, synchronised before "
                        "the clock is read")


def frozen_script(model):
    """torch.jit.script, then freeze: weights become constants and the dense routing's folded
    weight products are computed once, as a deployment would do."""
    return torch.jit.freeze(torch.jit.script(model.eval()))


def compiled(model, device, bf16):
    """torch.compile with dynamic batch shapes, compiled here (not inside the timings) on the
    batch shapes the timings use."""
    model = torch.compile(model, dynamic=True)
    forward = forward_logits(model, device, bf16)
    for size in (2, 1):
        forward(torch.zeros(size, 1, 28, 28, device=device))
    return model


class CudaGraphed:
    """The model replayed from a CUDA graph captured once per input shape: one launch instead of
    one per kernel, which is where the time goes at batch 1."""

    def __init__(self, model):
        self.model, self.graphs = model, {}

    def capture(self, example):
        static_input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
                self.model(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_output = self.model(static_input)
        return graph, static_input, static_output

    def __call__(self, x):
        key = tuple(x.shape)
        if key not in self.graphs:
            self.graphs[key] = self.capture(x)
        graph, static_input, static_output = self.graphs[key]
        static_input.copy_(x)
        graph.replay()
        return tuple(output.clone() for output in static_output)  # the next replay overwrites them


def cuda_graphed(model, structure):
    if structure["ROUTING"] != "dense":
        raise UserError("--variant cuda-graph needs --routing dense: the loop routing's NonZero "
                        "synchronises with the host, which a CUDA graph cannot capture")
    graphed = CudaGraphed(model)
    graphed(torch.zeros(1, 1, 28, 28, device="cuda"))
    return graphed


def has_bf16(device):
    return device == "cuda" or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def ready_model(variant, model, structure, device, kernel=None):
    model = model.to(device)
    if variant == "torchscript":
        return frozen_script(model)
    if variant in ("compile", "compile-bf16"):
        return compiled(model, torch.device(device), variant == "compile-bf16")
    if variant == "cuda-graph":
        return cuda_graphed(model, structure)
    if variant == "fused-int8":
        return fused.FusedInt8(model, structure, kernel)
    return model


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"


BUILT_BY = {"compile": "compilation", "compile-bf16": "compilation", "cuda-graph": "graph capture",
            "fused-int8": "the operator's build (cached after the first) and weight packing"}


def available(variant, device):
    """'' where `variant` runs on `device`, else why not (one clause)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    if variant == "cuda-graph" and device != "cuda":
        return "needs a CUDA device"
    if variant == "compile-bf16" and not has_bf16(device):
        return "the CPU has no avx512_bf16/amx_bf16"
    if variant == "fused-int8" and device != "cpu":
        return "CPU only"
    return ""


def runner(variant, model, structure, device="cpu", name=None, kernel=None):
    """The trained model made ready as `variant` on `device` (compiled, frozen, packed or captured
    here, before any timing); predict() returns logits and gates as numpy. On CUDA it is also timed
    device-resident."""
    import time
    started = time.perf_counter()
    ready = ready_model(variant, model, structure, device, kernel)
    setup_s = time.perf_counter() - started
    bf16 = variant == "compile-bf16"
    fused_op = isinstance(ready, fused.FusedInt8)

    def predict(pixels):
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            outputs = ready(torch.from_numpy(pixels).to(device))
        return tuple(output.float().cpu().numpy() for output in outputs[:2])
    if fused_op:
        predict = ready.numpy  # numpy in and out, the weights held in the operator
    precision = {"compile-bf16": "bf16 autocast", "fused-int8": "int8"}.get(variant, "fp32")
    described = {"engine": f"PyTorch {torch.__version__}", "provider": f"{LABELS[variant]} on {device.upper()}",
                 "precision": precision, "threads": torch.get_num_threads() if device == "cpu" else device_name(device)}
    if variant in BUILT_BY:
        described["setup holds"] = f"{BUILT_BY[variant]}, {setup_s:.1f} s"
    if fused_op:
        described["kernel"] = fused.describe(ready.kernel)
    resident = {"resident": resident_clock(ready, torch.device(device), bf16)} if device == "cuda" else {}
    return Runner(name or f"PyTorch {LABELS[variant]} on {device.upper()} ({device_name(device)})", predict, described,
                  engine=ready,
                  logits=fused.predictor(ready) if fused_op else predictor(ready, device, bf16), clocks=resident,
                  versions={"torch": torch.__version__})


def served_fused(path, checkpoint_path, threads=0, precision="auto"):
    """serve.py --backend fused-int8: the operator reads the checkpoint, and with it the model's own
    files (config.py, moe.py), so it serves where the repository is, never on a Ray worker."""
    from .. import checkpoint
    if threads:
        torch.set_num_threads(threads)
    model, structure, _ = checkpoint.load_model(checkpoint_path, {"ROUTING": "dense"})
    return runner("fused-int8", model, structure, name="fused INT8 operator")
