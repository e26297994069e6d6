"""PyTorch from the trained checkpoint: eager, TorchScript (frozen), torch.compile (fp32, and bf16
autocast where the device has bf16), the fused INT8 custom operator on the CPU (its fastest path for
this CPU, or MOE_FUSED_KERNEL's), and on CUDA a CUDA-graph replay; CPU, and CUDA when present.
On CUDA every variant is timed twice: end to end from host numpy arrays, and device-resident."""
import torch

import config
from common import checkpoint, fused, measure, viewer
from common.cli import ArgumentParser, UserError, error_line, run
from train import pick_device

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


def resident_runner(model, device, bf16=False):
    """Inputs already on the device before the clock starts; the clock stops after synchronising."""
    forward = forward_logits(model, device, bf16)
    return measure.Runner(forward, prepare=lambda batch: torch.from_numpy(batch).to(device),
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
    return device == "cuda" or bool({"avx512_bf16", "amx_bf16"} & measure.cpu_flags())


def variants(chosen, device):
    """[variant names] to run on `device`: all of them that it has, or the ones asked for."""
    available = [v for v in VARIANTS if (v != "cuda-graph" or device == "cuda")
                 and (v != "compile-bf16" or has_bf16(device))
                 and (v != "fused-int8" or device == "cpu")]
    if "all" in chosen:
        return available
    for choice in chosen:
        if choice not in available:
            raise UserError(f"--variant {choice} is not available on {device}" + {
                "cuda-graph": " (needs a CUDA device)", "compile-bf16": " (the CPU has no avx512_bf16/amx_bf16)",
                "fused-int8": " (CPU only)"}.get(choice, ""))
    return [v for v in VARIANTS if v in chosen]


def ready_model(variant, model, structure, device):
    model = model.to(device)
    if variant == "torchscript":
        return frozen_script(model)
    if variant in ("compile", "compile-bf16"):
        return compiled(model, torch.device(device), variant == "compile-bf16")
    if variant == "cuda-graph":
        return cuda_graphed(model, structure)
    if variant == "fused-int8":
        return fused.FusedInt8(model, structure)
    return model


def devices(choice):
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pick_device(choice).type]


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def runners(model, device, bf16):
    """The timing modes for a device: host arrays everywhere, and device-resident on CUDA."""
    predict = fused.predictor(model) if isinstance(model, fused.FusedInt8) else predictor(model, device, bf16)
    host = measure.Runner(predict)
    return [host] + ([resident_runner(model, torch.device(device), bf16)] if device == "cuda" else [])


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=checkpoint.DEFAULT_PATH, help="checkpoint from train.py")
    measure.add_common_args(parser)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="all: CPU, and CUDA when PyTorch sees a GPU (default)")
    parser.add_argument("--variant", nargs="+", choices=("all",) + VARIANTS, default=["all"],
                        help="one or more variants; all: every variant the device has (default)")
    parser.add_argument("--scripted", default=checkpoint.SCRIPTED_PATH,
                        help="TorchScript file train.py wrote; what --netron shows")
    config.add_structure_args(parser)
    viewer.add_netron_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    chosen = {device: variants(args.variant, device) for device in devices(args.device)}
    (model, structure, _), load_s = measure.timed(
        lambda: checkpoint.load_model(args.model, config.overrides(args)))
    images, labels = measure.load_test_set(args)
    records = []
    for device, names in chosen.items():
        for variant in names:
            try:
                ready, setup_s = measure.timed(lambda: ready_model(variant, model, structure, device))
            except Exception as error:  # one variant that cannot be built here does not end the others
                if args.variant != ["all"]:
                    if isinstance(error, UserError):
                        raise
                    raise UserError(f"--variant {variant} on {device}: {error_line(error, 300)}")
                print(f"skipped PyTorch {LABELS[variant]} on {device.upper()}: it could not be built here "
                      f"({error_line(error, 300)})", flush=True)
                continue
            what = {"cuda-graph": "graph capture", "fused-int8": "the operator's build (cached after the first) "
                    "and weight packing"}.get(variant, "compilation")
            details = {"setup holds": f"{what}, {setup_s:.1f} s"} if variant not in ("eager", "torchscript") else {}
            if variant == "fused-int8":
                details["kernel"] = fused.describe(ready.kernel)
            for runner in runners(ready, device, variant == "compile-bf16"):
                result = measure.measure(runner, images, labels, args.batch_size, args.latency_runs, not args.quiet)
                records.append(measure.report(
                    args, f"PyTorch {LABELS[variant]} on {device.upper()} ({device_name(device)})", result,
                    load_s + setup_s, measure.library_versions(torch), details))
    if args.netron:
        viewer.serve(args.scripted, args)
    return records


if __name__ == "__main__":
    run(main)
