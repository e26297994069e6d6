"""FP16 copy of the model (fp32 inputs and outputs kept); CUDA when present, else CPU, said so."""
from dataclasses import replace

from moebench import onnx_backend
from moebench.cli import ArgumentParser, run
from moebench.convert import fp16_copy
from moebench.runners.onnx_runtime import gpu_name


def main(argv=None):
    import onnxruntime as ort
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    run = onnx_backend.Run.from_flags(parser.parse_args(argv), on_gpu)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
    source = run.model
    run = replace(run, model=fp16_copy(source))
    note = ("CUDA" if on_gpu else "CPU: no CUDAExecutionProvider here; fp16 pays off on GPUs, "
            "a CPU mostly converts it back to fp32")
    where = f"CUDA on {gpu_name()}" if on_gpu else "CPU"
    return onnx_backend.run_backend(run, f"ONNX Runtime FP16 on {where}", providers, device="cuda" if on_gpu else "cpu",
                                    details={"converted": f"{source} -> {run.model}", "note": note},
                                    precision="fp16" if on_gpu else "fp16 weights, fp32 compute")


if __name__ == "__main__":
    run(main)
