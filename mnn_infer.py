"""Alibaba's MNN, a mobile inference engine: the exported ONNX model converted once to an .mnn model
(cached), run through MNN's Module API on its CPU backend at fp32, on one thread (as on a phone's core)
or more; --weight-bits 8 stores the weights as int8 (MNN's weight quantization; the arithmetic stays
fp32); --int8 quantizes weights and activations with MNN's offline quantizer (mnnquant), calibrated
on training images. MNN takes both graphs. The model is converted and called in
moebench/runners/mnn_runtime.py, runner()."""
from data import load_split
from moebench import backend_script
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import mnn_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--weight-bits", type=int, choices=(0, 8), default=0,
                        help="8: weights stored as int8, computed in fp32 (default 0: fp32 weights)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights and activations, calibrated by mnnquant on training images (default fp32)")
    parser.add_argument("--calibration-images", type=positive_int, default=500,
                        help="training images --int8 calibrates on (default 500)")
    backend_script.add_cache_arg(parser, "converted models")
    args = parser.parse_args(argv)
    calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy() if args.int8 else None
    measurement = backend_script.Measurement.from_flags(args)
    return backend_script.measure(lambda: mnn_runtime.runner(measurement.model, args.cache_dir, args.threads,
                                                             args.weight_bits, calibration), measurement)


if __name__ == "__main__":
    run(main)
