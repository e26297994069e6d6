"""FP16 copy of the model (fp32 inputs and outputs kept); CUDA when present, else CPU, said so."""
from common import sessions
from common.cli import ArgumentParser, run


def fp16_copy(path, target=None):
    """<model>.fp16.onnx (or target): fp16 weights and arithmetic, fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return sessions.derived_copy(path, ".fp16.onnx", lambda model: convert_float_to_float16(
        model, keep_io_types=True), target)


def main(argv=None):
    import onnxruntime as ort
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    args = sessions.parse_args(parser, argv, on_gpu)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
    source = args.model
    args.model = fp16_copy(source)
    note = ("CUDA" if on_gpu else "CPU: no CUDAExecutionProvider here; fp16 pays off on GPUs, "
            "a CPU mostly converts it back to fp32")
    where = f"CUDA on {sessions.gpu_name()}" if on_gpu else "CPU"
    return sessions.run_backend(args, f"ONNX Runtime FP16 on {where}", providers, device="cuda" if on_gpu else "cpu",
                                details={"converted": f"{source} -> {args.model}", "note": note})


if __name__ == "__main__":
    run(main)
