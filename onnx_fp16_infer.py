"""FP16 copy of the model (fp32 inputs and outputs kept); CUDA when present, else CPU, said so. The
session is built and called in moebench/runners/onnx_runtime.py, runner() (device 'auto')."""
from moebench import backend_script
from moebench.cli import ArgumentParser, run
from moebench.convert import fp16_copy
from moebench.runners import onnx_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser, "fp32 ONNX model from export_onnx.py")
    backend_script.add_onnx_runtime_args(parser)
    args = parser.parse_args(argv)
    on_gpu = onnx_runtime.cuda_available()
    source = backend_script.model_path(args.model, args.routing)
    measurement = backend_script.Measurement.from_flags(args, fp16_copy(source), on_gpu)
    details = {"converted": f"{source} -> {measurement.model}",
               "note": "CUDA" if on_gpu else ("CPU: no CUDAExecutionProvider here; fp16 pays off on GPUs, "
                                              "a CPU mostly converts it back to fp32")}
    if args.kernels:
        details = onnx_runtime.with_kernels(details, [measurement.model], onnx_runtime.providers_for("auto"))
    name = f"ONNX Runtime FP16 on {f'CUDA on {onnx_runtime.gpu_name()}' if on_gpu else 'CPU'}"
    return backend_script.measure(
        lambda: onnx_runtime.runner(measurement.model, name, "auto",
                                    precision="fp16" if on_gpu else "fp16 weights, fp32 compute"), measurement, details)


if __name__ == "__main__":
    run(main)
