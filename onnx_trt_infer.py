"""ONNX Runtime, TensorRT execution provider, on a symbolically shape-inferred copy of the model."""
import os

from common import contract, sessions
from common.cli import ArgumentParser, UserError, run


def shape_inferred_copy(path):
    """TensorRT needs every shape known: write <model>.trt.onnx with symbolic shape inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def infer(model):
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as error:
            raise UserError(f"{path}: symbolic shape inference failed ({error}); install sympy")
    return sessions.derived_copy(path, ".trt.onnx", infer)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "ONNX model from export_onnx.py")
    parser.add_argument("--engine-cache", default="trt_cache", help="TensorRT engine cache directory")
    parser.add_argument("--fp16", action="store_true", help="let TensorRT build fp16 kernels")
    parser.add_argument("--device-id", type=int, default=0)
    args = sessions.parse_args(parser, argv)
    trt_options = {"device_id": args.device_id, "trt_fp16_enable": args.fp16,
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": args.engine_cache}
    providers = [("TensorrtExecutionProvider", trt_options),
                 ("CUDAExecutionProvider", {"device_id": args.device_id}), "CPUExecutionProvider"]
    sessions.require_providers(providers)
    os.makedirs(args.engine_cache, exist_ok=True)
    args.model = shape_inferred_copy(args.model)
    total = len(contract.check_onnx(args.model).graph.node)
    return sessions.run_backend(args, f"ONNX Runtime TensorRT{' fp16' if args.fp16 else ''}",
                                providers, details={"graph": f"{total} ONNX nodes before partitioning; "
                                                    "TensorRT kernels are fused subgraphs, the rest fell back"})


if __name__ == "__main__":
    run(main)
