"""INT8 on ONNX Runtime CPU: dynamic quantization and static QDQ quantization calibrated on
training images (never test images); each compared with the fp32 model's accuracy."""
import logging
import os

from common import contract, measure, sessions, viewer
from common.cli import ArgumentParser, positive_int, run
from data import load_split


class TrainingImages:
    """onnxruntime's CalibrationDataReader protocol over the first N training images."""

    def __init__(self, images, batch_size=100):
        self.batches = iter([{"pixels": images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize(source, target, method, calibration=None, per_channel=False, reduce_range=False):
    """Write an INT8 copy of `source`: method 'dynamic', or 'static QDQ' calibrated on `calibration`
    (training images, float32 (N, 1, 28, 28))."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer dumps every unknown NonZero shape
    # Only the matrix ops, where all the arithmetic is: with QDQ also around the loop routing's
    # Gather/ScatterElements, onnxruntime 1.31.1 crashes (segfault) running the static model.
    options = {"per_channel": per_channel, "reduce_range": reduce_range,
              "op_types_to_quantize": ["Gemm", "MatMul"]}
    contract.check_onnx(source)
    if method == "dynamic":
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, **options)
    else:
        quantize_static(source, target, TrainingImages(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, **options)
    return target


def quantized_copies(path, args):
    """{'dynamic': path, 'static QDQ': path}, written beside the fp32 model."""
    stem = os.path.splitext(path)[0]
    calibration, _ = load_split("train", args.data_dir, args.calibration_images)
    options = {"per_channel": args.per_channel, "reduce_range": args.reduce_range}
    return {"dynamic": quantize(path, stem + ".int8-dynamic.onnx", "dynamic", **options),
            "static QDQ": quantize(path, stem + ".int8-static.onnx", "static QDQ",
                                   calibration.numpy(), **options)}


def fp32_accuracy(path, args):
    images, labels = measure.load_test_set(args)
    predict = sessions.predictor(sessions.create_session(path, ["CPUExecutionProvider"]))
    return 100.0 * float((measure.full_pass(predict, images, 1000).argmax(1) == labels).mean())


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    parser.add_argument("--calibration-images", type=positive_int, default=1000,
                        help="training images used to calibrate static quantization (default 1000)")
    parser.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights: avoids int16 overflow on CPUs without VNNI")
    args = sessions.parse_args(parser, argv)
    contract.check_onnx(args.model)
    netron, args.netron = args.netron, False  # show the static QDQ graph once, after both runs
    baseline = fp32_accuracy(args.model, args)
    fp32_size = os.path.getsize(args.model)
    results = {}
    for method, path in quantized_copies(args.model, args).items():
        args.model = path
        size = os.path.getsize(path)
        records = sessions.run_backend(args, f"ONNX Runtime INT8 {method}", ["CPUExecutionProvider"], details={
            "quantized": f"per-channel {args.per_channel}, reduce-range {args.reduce_range}, "
                         f"{args.calibration_images if method != 'dynamic' else 0} training images for calibration",
            "size": f"{size / 1e6:.2f} MB vs {fp32_size / 1e6:.2f} MB fp32 ({size / fp32_size:.0%})",
            "vs fp32": f"fp32 accuracy {baseline:.2f}%"})
        print(f"   change        {records[0]['accuracy'] - baseline:+.2f} points of accuracy against fp32")
        results[method] = records[0]
    if netron:
        viewer.serve(results["static QDQ"]["model"], args)
    return results


if __name__ == "__main__":
    run(main)
