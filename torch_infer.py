"""PyTorch: eager and TorchScript, on CPU and (when present) CUDA, from the trained checkpoint."""

import torch

import config
from common import checkpoint, measure, viewer
from common.cli import ArgumentParser, run
from train import pick_device


def predictor(model, device):
    def predict(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch).to(device))[0].cpu().numpy()
    return predict


def devices(choice):
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pick_device(choice).type]


def frozen_script(model):
    """torch.jit.script, then freeze: weights become constants and the dense routing's folded
    weight products are computed once, as a deployment would do."""
    return torch.jit.freeze(torch.jit.script(model.eval()))


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=checkpoint.DEFAULT_PATH, help="checkpoint from train.py")
    measure.add_common_args(parser)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="all: CPU, and CUDA when PyTorch sees a GPU (default)")
    parser.add_argument("--variant", choices=("both", "eager", "torchscript"), default="both")
    parser.add_argument("--scripted", default=checkpoint.SCRIPTED_PATH,
                        help="TorchScript file train.py wrote; what --netron shows")
    config.add_structure_args(parser)
    viewer.add_netron_args(parser)
    args = parser.parse_args(argv)
    chosen_devices = devices(args.device)
    (model, _, _), load_s = measure.timed(lambda: checkpoint.load_model(args.model, config.overrides(args)))
    images, labels = measure.load_test_set(args)
    records = []
    for device in chosen_devices:
        variants = {"eager": lambda: model.to(device), "TorchScript": lambda: frozen_script(model.to(device))}
        for variant, make in variants.items():
            if args.variant not in ("both", variant.lower()):
                continue
            ready, setup_s = measure.timed(make)
            result = measure.measure(predictor(ready, device), images, labels, args.batch_size,
                                     args.latency_runs, not args.quiet)
            records.append(measure.report(
                args, f"PyTorch {variant}{' (frozen)' if variant == 'TorchScript' else ''} on {device.upper()} ({device_name(device)})", result,
                load_s + setup_s, measure.library_versions(torch)))
    if args.netron:
        viewer.serve(args.scripted, args)
    return records


if __name__ == "__main__":
    run(main)
