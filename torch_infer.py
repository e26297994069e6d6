"""PyTorch from the trained checkpoint: eager, TorchScript (frozen), torch.compile (fp32, and bf16
autocast where the device has bf16), the fused INT8 custom operator on the CPU (its fastest path for
this CPU, or MOE_FUSED_KERNEL's), and on CUDA a CUDA-graph replay; CPU, and CUDA when present.
On CUDA every variant is timed twice: end to end from host numpy arrays, and device-resident. Each
variant is made ready and called in moebench/runners/pytorch.py, runner()."""
from dataclasses import replace

import torch

import config
from moebench import backend_script, checkpoint, netron
from moebench.cli import ArgumentParser, UserError, error_line, for_the_user, run
from moebench.measuring import block
from moebench.runners import pytorch


class Skipped(Exception):
    """A variant that cannot be built here, when the user asked for every variant: said, not fatal."""


def variants(chosen, device):
    """[variant names] to run on `device`: all of them that it has, or the ones asked for."""
    if "all" in chosen:
        return [v for v in pytorch.VARIANTS if not pytorch.available(v, device)]
    for choice in chosen:
        if pytorch.available(choice, device):
            raise UserError(f"--variant {choice} is not available on {device} ({pytorch.available(choice, device)})")
    return [v for v in pytorch.VARIANTS if v in chosen]


def devices(choice):
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytorch.pick_device(choice).type]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=checkpoint.DEFAULT_PATH, help="checkpoint from train.py")
    block.add_measure_args(parser)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="all: CPU, and CUDA when PyTorch sees a GPU (default)")
    parser.add_argument("--variant", nargs="+", choices=("all",) + pytorch.VARIANTS, default=["all"],
                        help="one or more variants; all: every variant the device has (default)")
    parser.add_argument("--scripted", default=checkpoint.SCRIPTED_PATH,
                        help="TorchScript file train.py wrote; what --netron shows")
    config.add_structure_args(parser)
    netron.add_netron_args(parser)
    return parser.parse_args(argv)


def made(variant, model, structure, device, asked):
    """The runner for `variant`; Skipped (said in one line) where it cannot be built here and the
    user asked for every variant."""
    try:
        return pytorch.runner(variant, model, structure, device)
    except Exception as error:  # one variant that cannot be built here does not end the others
        if asked:
            if for_the_user(error):
                raise
            raise UserError(f"--variant {variant} on {device}: {error_line(error, 300)}")
        raise Skipped(f"skipped PyTorch {pytorch.LABELS[variant]} on {device.upper()}: it could not be built here "
                      f"({error_line(error, 300)})")


def main(argv=None):
    args = parse_args(argv)
    chosen = {device: variants(args.variant, device) for device in devices(args.device)}
    model, structure, _ = checkpoint.load_model(args.model, config.overrides(args), "--model")
    measurement = backend_script.Measurement.from_flags(args, args.model)
    records = []
    for device, names in chosen.items():
        timings = ("host", "resident") if device == "cuda" else ("host",)
        for variant in names:
            try:
                records += backend_script.measure(
                    lambda: made(variant, model, structure, device, args.variant != ["all"]),
                    replace(measurement, timings=timings, netron=None))
            except Skipped as skipped:
                print(skipped, flush=True)
    netron.serve_if_asked(args.scripted, measurement.netron)
    return records


if __name__ == "__main__":
    run(main)
