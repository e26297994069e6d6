"""OpenVINO on CPU, reading the exported ONNX file as it is: fp32, bf16 or OpenVINO's own choice,
a latency or throughput hint, and INT8 from NNCF post-training quantization on training images."""
from data import load_split
from moebench import measure, onnx_scripts, viewer
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import openvino_cpu


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_scripts.add_model_args(parser, "ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--precision", choices=openvino_cpu.PRECISIONS, default="auto",
                        help="floating-point precision; auto lets OpenVINO choose (bf16 on CPUs that have "
                             "it); the block says which really ran (default auto)")
    parser.add_argument("--hint", choices=openvino_cpu.HINTS, default="latency",
                        help="OpenVINO performance hint (default latency)")
    parser.add_argument("--int8", action="store_true",
                        help="quantize the embedding and expert products to INT8 with NNCF first")
    parser.add_argument("--calibration-images", type=positive_int, default=300,
                        help="training images that calibrate --int8 (default 300)")
    return onnx_scripts.parse_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    images, labels = measure.load_test_set(args)
    model = openvino_cpu.read(args.model)
    details = {}
    if args.int8:
        fp32 = openvino_cpu.accuracy(openvino_cpu.compile_model(model, "f32"), images, labels)
        calibration = load_split("train", args.data_dir, args.calibration_images)[0].numpy()
        (model, quantized), quantize_s = measure.timed(lambda: openvino_cpu.quantize_int8(model, calibration))
        details["quantized"] = (f"NNCF INT8: {len(quantized)} matrix products (embedding, experts), gate in "
                                f"float; {args.calibration_images} training images, {quantize_s:.1f} s")
    compiled, setup_s = measure.timed(lambda: openvino_cpu.compile_model(model, args.precision, args.hint))
    used = openvino_cpu.settings_used(compiled)
    details["precision"] = (f"{'int8 products, the rest ' if args.int8 else ''}{used['precision']} "
                            f"(asked: {args.precision}; from the compiled model's INFERENCE_PRECISION_HINT)")
    details["settings"] = f"{used['hint']} hint, {used['streams']} streams, {used['threads']} threads"
    result = measure.measure(openvino_cpu.clock(compiled), images, labels, args.batch_size,
                             args.latency_runs, not args.quiet)
    if args.int8:
        details["vs fp32"] = f"fp32 accuracy {fp32:.2f}%, change {result['accuracy'] - fp32:+.2f} points"
    label = f"OpenVINO CPU{' INT8' if args.int8 else ''} ({used['precision']}, {used['hint']} hint)"
    record = measure.report(args, label, result, setup_s, openvino_cpu.versions(args.int8), details)
    if args.netron:
        viewer.serve(args.model, args)
    return record


if __name__ == "__main__":
    run(main)
