"""ONNX Runtime, CUDA execution provider (needs requirements-gpu.txt on a CUDA machine): timed end to
end from host numpy arrays and device-resident (IOBinding), and batch 1 replayed from a CUDA graph.
The session is built and called in moebench/runners/onnx_runtime.py, runner() (device 'cuda'), the
CUDA graph in cuda_graph_latency()."""
from moebench import backend_script
from moebench.cli import ArgumentParser, run
from moebench.measuring.block import print_block
from moebench.measuring.clock import latency_summary
from moebench.runners import onnx_runtime
from moebench.test_set import load_test_set


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    backend_script.add_onnx_runtime_args(parser, kernels=True)
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph batch-1 run")
    args = parser.parse_args(argv)
    measurement = backend_script.Measurement.from_flags(args, on_gpu=True)
    providers = onnx_runtime.providers_for("cuda", args.device_id)
    gpu = onnx_runtime.gpu_name(args.device_id)
    records = backend_script.measure(lambda: onnx_runtime.runner(measurement.model, f"ONNX Runtime CUDA on {gpu}",
                                                                 providers=providers, device_id=args.device_id),
                                     measurement,
                                     onnx_runtime.with_kernels({}, [measurement.model], providers)
                                     if args.kernels else None)
    if not args.no_cuda_graph:
        images, labels = load_test_set(args.data_dir, args.test_limit)
        logits, latencies = onnx_runtime.cuda_graph_latency(measurement.model, args.device_id, images,
                                                             args.latency_runs)
        result = latency_summary(logits, labels, latencies,
                                 "device-resident: IOBinding with fixed buffers, enable_cuda_graph; each image "
                                 "copied into the fixed input before the clock starts (the first runs capture "
                                 "the graph)")
        records.append(print_block(f"ONNX Runtime CUDA, CUDA graph on {gpu}", measurement.model, result,
                                   onnx_runtime.versions(), json_path=args.json))
    return records


if __name__ == "__main__":
    run(main)
