"""ONNX Runtime, TensorRT execution provider (CUDA and CPU take what TensorRT cannot), on a
symbolically shape-inferred copy of the model: one optimisation profile for the dynamic batch,
engine and timing caches, optional fp16. --check-only runs the static support check on any machine."""
import os

from common import contract, sessions, tensorrt_support
from common.cli import ArgumentParser, UserError, positive_int, run

TENSORRT_INSTALL = ("pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13==10.16.1.11 and put "
                    "its libraries on LD_LIBRARY_PATH (see README: onnxruntime-gpu 1.31.1's TensorRT provider "
                    "links libnvinfer.so.10)")


def shape_inferred_copy(path):
    """TensorRT needs every shape known: write <model>.trt.onnx with symbolic shape inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def infer(model):
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as error:
            raise UserError(f"{path}: symbolic shape inference failed ({error}); install sympy")
    return sessions.derived_copy(path, ".trt.onnx", infer)


def profile(batch):
    return f"{contract.PIXELS}:{batch}x1x28x28"


def tensorrt_options(args):
    """The TensorRT provider's options, by ONNX Runtime's documentation of them."""
    return {"device_id": args.device_id, "trt_fp16_enable": args.fp16,
            "trt_profile_min_shapes": profile(1), "trt_profile_opt_shapes": profile(args.batch_size),
            "trt_profile_max_shapes": profile(max(args.max_batch, args.batch_size)),
            "trt_engine_cache_enable": True, "trt_engine_cache_path": args.engine_cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": args.engine_cache}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "ONNX model from export_onnx.py")
    parser.add_argument("--engine-cache", default="trt_cache", help="engine and timing cache directory")
    parser.add_argument("--fp16", action="store_true", help="let TensorRT build fp16 kernels")
    parser.add_argument("--max-batch", type=positive_int, default=10000,
                        help="largest batch the optimisation profile covers (default 10000; min 1, opt --batch-size)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--check-only", action="store_true",
                        help="only check the graph against onnx-tensorrt's support matrix (exit 1 if a node "
                             "is not supported); needs no GPU")
    return sessions.parse_args(parser, argv, on_gpu=True)


def main(argv=None):
    args = parse_args(argv)
    static_check = tensorrt_support.summary(contract.check_onnx(args.model))
    if args.check_only:
        print(f"{args.model}: {static_check}")
        if "not supported" in static_check:
            raise SystemExit(1)
        return static_check
    providers = [("TensorrtExecutionProvider", tensorrt_options(args)),
                 ("CUDAExecutionProvider", {"device_id": args.device_id}), "CPUExecutionProvider"]
    try:
        sessions.require_providers(providers)
    except UserError as error:
        raise UserError(str(error).replace(sessions.GPU_INSTALL, sessions.GPU_INSTALL + ", then " + TENSORRT_INSTALL))
    os.makedirs(args.engine_cache, exist_ok=True)
    args.model = shape_inferred_copy(args.model)
    return sessions.run_backend(
        args, f"ONNX Runtime TensorRT{' fp16' if args.fp16 else ''} on {sessions.gpu_name(args.device_id)}",
        providers, device="cuda", device_id=args.device_id,
        details={"profile": f"batch 1 / {args.batch_size} / {max(args.max_batch, args.batch_size)} (min/opt/max)",
                 "static check": static_check})


if __name__ == "__main__":
    run(main)
