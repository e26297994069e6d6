"""ONNX Runtime, TensorRT execution provider (CUDA and CPU take what TensorRT cannot), on a
symbolically shape-inferred copy of the model: one optimisation profile for the dynamic batch,
engine and timing caches, optional fp16. --check-only runs the static support check on any machine.
The session is built and called in moebench/runners/onnx_runtime.py, runner(), with the TensorRT
provider's options from moebench/tensorrt_support.py, tensorrt_options()."""
import os

from moebench import backend_script, contract, tensorrt_support
from moebench.cli import ArgumentParser, UserError, positive_int, run
from moebench.runners import onnx_runtime
from moebench.tensorrt_support import TENSORRT_INSTALL, shape_inferred_copy, tensorrt_options


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    backend_script.add_onnx_runtime_args(parser, kernels=True)
    parser.add_argument("--engine-cache", default="trt_cache", help="engine and timing cache directory")
    parser.add_argument("--fp16", action="store_true", help="let TensorRT build fp16 kernels")
    parser.add_argument("--max-batch", type=positive_int, default=10000,
                        help="largest batch the optimisation profile covers (default 10000; min 1, opt --batch-size)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--check-only", action="store_true",
                        help="only check the graph against onnx-tensorrt's support matrix (exit 1 if a node "
                             "is not supported); needs no GPU")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source = backend_script.model_path(args.model, args.routing)
    static_check = tensorrt_support.summary(contract.check_onnx(source))
    if args.check_only:
        print(f"{source}: {static_check}")
        if "not supported" in static_check:
            raise SystemExit(1)
        return static_check
    providers = [("TensorrtExecutionProvider", tensorrt_options(args.device_id, args.fp16, args.batch_size,
                                                                args.max_batch, args.engine_cache))]
    providers += onnx_runtime.providers_for("cuda", args.device_id)
    try:
        onnx_runtime.require_providers(providers)  # said with TensorRT's install line before the copy is made
    except UserError as error:
        raise UserError(str(error).replace(onnx_runtime.GPU_INSTALL,
                                           onnx_runtime.GPU_INSTALL + ", then " + TENSORRT_INSTALL))
    os.makedirs(args.engine_cache, exist_ok=True)
    measurement = backend_script.Measurement.from_flags(args, shape_inferred_copy(source), on_gpu=True)
    details = {"profile": f"batch 1 / {args.batch_size} / {max(args.max_batch, args.batch_size)} (min/opt/max)",
               "static check": static_check}
    name = f"ONNX Runtime TensorRT{' fp16' if args.fp16 else ''} on {onnx_runtime.gpu_name(args.device_id)}"
    return backend_script.measure(
        lambda: onnx_runtime.runner(measurement.model, name, providers=providers,
                                    precision="fp16" if args.fp16 else "fp32", device_id=args.device_id),
        measurement, onnx_runtime.with_kernels(details, [measurement.model], providers) if args.kernels else details)


if __name__ == "__main__":
    run(main)
