"""OpenVINO on CPU, reading the exported ONNX file as it is: fp32, bf16 or OpenVINO's own choice,
a latency or throughput hint, and INT8 from NNCF post-training quantization on training images. The
model is compiled and called in moebench/runners/openvino_cpu.py, runner()."""
from data import load_split
from moebench import backend_script
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import openvino_cpu
from moebench.test_set import load_test_set


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    parser.add_argument("--precision", choices=openvino_cpu.PRECISIONS, default="auto",
                        help="floating-point precision; auto lets OpenVINO choose (bf16 on CPUs that have "
                             "it); the block says which really ran (default auto)")
    parser.add_argument("--hint", choices=openvino_cpu.HINTS, default="latency",
                        help="OpenVINO performance hint (default latency)")
    parser.add_argument("--int8", action="store_true",
                        help="quantize the embedding and expert products to INT8 with NNCF first")
    parser.add_argument("--calibration-images", type=positive_int, default=300,
                        help="training images that calibrate --int8 (default 300)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    measurement = backend_script.Measurement.from_flags(args)
    test_set = load_test_set(args.data_dir, args.test_limit)
    calibration = baseline = None
    if args.int8:
        with openvino_cpu.runner(measurement.model, precision="f32") as fp32:
            baseline = backend_script.test_set_accuracy(fp32, test_set)
        calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy()

    def shown(runner):
        """What the compiled model says it computes in; for INT8, the change against fp32."""
        used = runner.describe()["precision"]
        details = {"precision": f"{used} (asked: {args.precision}; from the compiled model's "
                                "INFERENCE_PRECISION_HINT)"}
        if args.int8:
            change = backend_script.test_set_accuracy(runner, test_set) - baseline
            details["vs fp32"] = f"fp32 accuracy {baseline:.2f}%, change {change:+.2f} points"
        return details
    return backend_script.measure(lambda: openvino_cpu.runner(measurement.model, precision=args.precision,
                                                              hint=args.hint, calibration=calibration),
                                  measurement, shown)


if __name__ == "__main__":
    run(main)
