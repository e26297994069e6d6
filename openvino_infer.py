"""OpenVINO on CPU, reading the exported ONNX file as it is: fp32, bf16 or OpenVINO's own choice,
a latency or throughput hint, and INT8 from NNCF post-training quantization on training images."""
from data import load_split
from moebench import netron, onnx_backend
from moebench.cli import ArgumentParser, positive_int, run
from moebench.measuring import block
from moebench.measuring.clock import timed
from moebench.runners import openvino_cpu
from moebench.test_set import load_test_set


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--precision", choices=openvino_cpu.PRECISIONS, default="auto",
                        help="floating-point precision; auto lets OpenVINO choose (bf16 on CPUs that have "
                             "it); the block says which really ran (default auto)")
    parser.add_argument("--hint", choices=openvino_cpu.HINTS, default="latency",
                        help="OpenVINO performance hint (default latency)")
    parser.add_argument("--int8", action="store_true",
                        help="quantize the embedding and expert products to INT8 with NNCF first")
    parser.add_argument("--calibration-images", type=positive_int, default=300,
                        help="training images that calibrate --int8 (default 300)")
    args = parser.parse_args(argv)
    args.model = onnx_backend.Run.from_flags(args).model
    return args


def main(argv=None):
    args = parse_args(argv)
    test_set = load_test_set(args.data_dir, args.test_limit)
    details, calibration = {}, None
    if args.int8:
        with openvino_cpu.runner(args.model, precision="f32") as fp32:
            fp32_accuracy = openvino_cpu.accuracy(fp32.engine, *test_set)
        calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy()
    runner, setup_s = timed(lambda: openvino_cpu.runner(args.model, precision=args.precision, hint=args.hint,
                                                        calibration=calibration))
    if args.int8:
        change = openvino_cpu.accuracy(runner.engine, *test_set) - fp32_accuracy
        details["vs fp32"] = f"fp32 accuracy {fp32_accuracy:.2f}%, change {change:+.2f} points"
    used = runner.describe()
    details["precision"] = (f"{used['precision']} (asked: {args.precision}; from the compiled model's "
                            "INFERENCE_PRECISION_HINT)")
    label = f"OpenVINO CPU{' INT8' if args.int8 else ''} ({used['precision'].split()[-1]}, {used['hint']} hint)"
    with runner:
        record = block.measure_runner(runner, test_set, block.Settings.from_flags(args), ("host",), label,
                                      args.model, setup_s, details)[0]
    netron.serve_if_asked(args.model, netron.asked(args))
    return record


if __name__ == "__main__":
    run(main)
