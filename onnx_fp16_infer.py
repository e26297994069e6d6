"""FP16 copy of the model (fp32 inputs and outputs kept); CUDA when present, else CPU, said so."""
import os

import onnx

import sessions
from cli import ArgumentParser, atomic_path, run


def fp16_copy(path, target=None):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    target = target or os.path.splitext(path)[0] + ".fp16.onnx"
    converted = convert_float_to_float16(sessions.load_onnx(path), keep_io_types=True)
    with atomic_path(target) as tmp:
        onnx.save(converted, tmp)
    return target


def main(argv=None):
    import onnxruntime as ort
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    args = sessions.parse_args(parser, argv)
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
    source = args.model
    args.model = fp16_copy(source)
    note = ("CUDA" if on_gpu else "CPU: no CUDAExecutionProvider here; fp16 pays off on GPUs, "
            "a CPU mostly converts it back to fp32")
    return sessions.run_backend(args, f"ONNX Runtime FP16 on {'CUDA' if on_gpu else 'CPU'}", providers,
                                details={"converted": f"{source} -> {args.model}", "note": note})


if __name__ == "__main__":
    run(main)
