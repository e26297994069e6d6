"""INT8 on ONNX Runtime CPU: dynamic quantization and static QDQ quantization calibrated on
training images (never test images); each compared with the fp32 model's accuracy. The copies are
written by moebench/convert.py, quantize(); each session is built and called in
moebench/runners/onnx_runtime.py, runner()."""
import os
from dataclasses import replace

from data import load_split
from moebench import backend_script, contract, netron
from moebench.cli import ArgumentParser, positive_int, run
from moebench.convert import quantize
from moebench.runners import onnx_runtime
from moebench.test_set import load_test_set


def quantized_copies(path, args):
    """{'dynamic': path, 'static QDQ': path}, written beside the fp32 model."""
    stem = os.path.splitext(path)[0]
    calibration, _ = load_split("train", args.data_dir, args.calibration_images)
    options = {"per_channel": args.per_channel, "reduce_range": args.reduce_range}
    return {"dynamic": quantize(path, stem + ".int8-dynamic.onnx", "dynamic", **options),
            "static QDQ": quantize(path, stem + ".int8-static.onnx", "static QDQ",
                                   calibration.numpy(), **options)}


def fp32_accuracy(path, args):
    with onnx_runtime.runner(path) as fp32:
        return backend_script.test_set_accuracy(fp32, load_test_set(args.data_dir, args.test_limit))


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    backend_script.add_onnx_runtime_args(parser)
    parser.add_argument("--calibration-images", type=positive_int, default=1000,
                        help="training images used to calibrate static quantization (default 1000)")
    parser.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights: avoids int16 overflow on CPUs without VNNI")
    args = parser.parse_args(argv)
    fp32 = backend_script.Measurement.from_flags(args)
    contract.check_onnx(fp32.model)
    baseline = fp32_accuracy(fp32.model, args)
    results = {}
    for method, path in quantized_copies(fp32.model, args).items():
        details = {"quantized": f"per-channel {args.per_channel}, reduce-range {args.reduce_range}, "
                                f"{args.calibration_images if method != 'dynamic' else 0} training images for "
                                "calibration",
                   "size": size_against(path, fp32.model), "vs fp32": f"fp32 accuracy {baseline:.2f}%"}
        if args.kernels:
            details = onnx_runtime.with_kernels(details, [path], ["CPUExecutionProvider"])
        # Netron shows the static QDQ graph once, after both runs
        records = backend_script.measure(lambda: onnx_runtime.runner(path, f"ONNX Runtime INT8 {method}",
                                                                     precision="int8"),
                                         replace(fp32, model=path, netron=None), details)
        print(f"   change        {records[0]['accuracy'] - baseline:+.2f} points of accuracy against fp32")
        results[method] = records[0]
    netron.serve_if_asked(results["static QDQ"]["model"], fp32.netron)
    return results


def size_against(path, fp32_path):
    size, fp32_size = os.path.getsize(path), os.path.getsize(fp32_path)
    return f"{size / 1e6:.2f} MB vs {fp32_size / 1e6:.2f} MB fp32 ({size / fp32_size:.0%})"


if __name__ == "__main__":
    run(main)
