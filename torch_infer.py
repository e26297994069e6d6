"""PyTorch from the trained checkpoint: eager, TorchScript (frozen), torch.compile (fp32, and bf16
autocast where the device has bf16), the fused INT8 custom operator on the CPU (its fastest path for
this CPU, or MOE_FUSED_KERNEL's), and on CUDA a CUDA-graph replay; CPU, and CUDA when present.
On CUDA every variant is timed twice: end to end from host numpy arrays, and device-resident."""
import torch

import config
from moebench import checkpoint, fused, measure, viewer
from moebench.cli import ArgumentParser, UserError, error_line, for_the_user, run
from moebench.runners.pytorch import LABELS, VARIANTS, clocks, device_name, has_bf16, pick_device, ready_model


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


def devices(choice):
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pick_device(choice).type]


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
                    if for_the_user(error):
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
            for clock in clocks(ready, device, variant == "compile-bf16"):
                result = measure.measure(clock, images, labels, args.batch_size, args.latency_runs, not args.quiet)
                records.append(measure.report(
                    args, f"PyTorch {LABELS[variant]} on {device.upper()} ({device_name(device)})", result,
                    load_s + setup_s, measure.library_versions(torch), details))
    if args.netron:
        viewer.serve(args.scripted, args)
    return records


if __name__ == "__main__":
    run(main)
