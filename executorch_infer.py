"""PyTorch's ExecuTorch, its runtime for phones and edge devices: the trained checkpoint exported with
torch.export (a dynamic batch), lowered with the XNNPACK partitioner into a .pte program (cached),
and run by ExecuTorch's runtime on every core by default; what XNNPACK cannot take (the gate's
top-k and scatter) runs on ExecuTorch's portable kernels, and the block says which. --int8 quantizes
first with XNNPACK's quantizer (int8 weights per channel, int8 activations with scales calibrated on
training images, never test images). ExecuTorch takes the dense routing. The program is lowered and
called in moebench/runners/executorch_runtime.py, runner()."""
from data import load_split
from moebench import backend_script, checkpoint
from moebench.cli import ArgumentParser, non_negative_int, positive_int, run
from moebench.measuring import block
from moebench.runners import executorch_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=checkpoint.DEFAULT_PATH, help="checkpoint from train.py")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads (default 0: one per core)")
    parser.add_argument("--int8", action="store_true", help="int8 weights and activations (default fp32)")
    parser.add_argument("--calibration-images", type=positive_int, default=1000,
                        help="training images the int8 scales are calibrated on (default 1000)")
    block.add_measure_args(parser)
    backend_script.add_cache_arg(parser, "lowered programs")
    args = parser.parse_args(argv)
    calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy() if args.int8 else None
    return backend_script.measure(
        lambda: executorch_runtime.runner(checkpoint.load_model(args.model, {"ROUTING": "dense"}, "--model")[0],
                                          args.cache_dir, args.threads, calibration),
        backend_script.Measurement.from_flags(args, args.model))


if __name__ == "__main__":
    run(main)
