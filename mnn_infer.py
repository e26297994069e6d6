"""Alibaba's MNN, a mobile inference engine: the exported ONNX model converted once to an .mnn model
(cached), run through MNN's Module API on its CPU backend at fp32, on one thread (as on a phone's core)
or more; --weight-bits 8 stores the weights as int8 (MNN's weight quantization; the arithmetic stays
fp32); --int8 quantizes weights and activations with MNN's offline quantizer (mnnquant), calibrated
on training images. MNN takes both graphs."""
from data import load_split
from moebench import onnx_backend
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import mnn_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--weight-bits", type=int, choices=(0, 8), default=0,
                        help="8: weights stored as int8, computed in fp32 (default 0: fp32 weights)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights and activations, calibrated by mnnquant on training images (default fp32)")
    parser.add_argument("--calibration-images", type=positive_int, default=500,
                        help="training images --int8 calibrates on (default 500)")
    onnx_backend.add_cache_arg(parser, "converted models")
    args = parser.parse_args(argv)
    calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy() if args.int8 else None
    label = (f"MNN {{}} CPU ({args.threads} thread{'s' if args.threads > 1 else ''}"
             + (", int8 weights" if args.weight_bits else "") + (", int8" if args.int8 else "") + ")")
    return onnx_backend.measure_made(
        onnx_backend.Run.from_flags(args), lambda model: mnn_runtime.runner(model, args.cache_dir, args.threads,
                                                                            args.weight_bits, calibration),
        lambda runner: label.format(runner.versions["mnn"]))


if __name__ == "__main__":
    run(main)
