"""ONNX Runtime, TensorRT execution provider (CUDA and CPU take what TensorRT cannot), on a
symbolically shape-inferred copy of the model: one optimisation profile for the dynamic batch,
engine and timing caches, optional fp16. --check-only runs the static support check on any machine."""
import os
from dataclasses import replace

from moebench import contract, onnx_backend, tensorrt_support
from moebench.cli import ArgumentParser, UserError, positive_int, run
from moebench.runners.onnx_runtime import GPU_INSTALL, gpu_name, require_providers
from moebench.tensorrt_support import TENSORRT_INSTALL, shape_inferred_copy, tensorrt_options

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py")
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
    run = onnx_backend.Run.from_flags(args, on_gpu=True)
    static_check = tensorrt_support.summary(contract.check_onnx(run.model))
    if args.check_only:
        print(f"{run.model}: {static_check}")
        if "not supported" in static_check:
            raise SystemExit(1)
        return static_check
    providers = [("TensorrtExecutionProvider", tensorrt_options(args.device_id, args.fp16, args.batch_size, args.max_batch, args.engine_cache)),
                 ("CUDAExecutionProvider", {"device_id": args.device_id}), "CPUExecutionProvider"]
    try:
        require_providers(providers)
    except UserError as error:
        raise UserError(str(error).replace(GPU_INSTALL, GPU_INSTALL + ", then " + TENSORRT_INSTALL))
    os.makedirs(args.engine_cache, exist_ok=True)
    return onnx_backend.run_backend(
        replace(run, model=shape_inferred_copy(run.model)), f"ONNX Runtime TensorRT{' fp16' if args.fp16 else ''} on {gpu_name(args.device_id)}",
        providers, device="cuda", device_id=args.device_id,
        details={"profile": f"batch 1 / {args.batch_size} / {max(args.max_batch, args.batch_size)} (min/opt/max)",
                 "static check": static_check}, precision="fp16" if args.fp16 else "fp32")


if __name__ == "__main__":
    run(main)
