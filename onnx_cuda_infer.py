"""ONNX Runtime, CUDA execution provider (needs requirements-gpu.txt on a CUDA machine): timed end to
end from host numpy arrays and device-resident (IOBinding), and batch 1 replayed from a CUDA graph."""
from moebench import onnx_backend
from moebench.measuring.block import print_latency_block
from moebench.test_set import load_test_set
from moebench.runners import onnx_runtime
from moebench.runners.onnx_runtime import cuda_graph_latency, gpu_name
from moebench.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph batch-1 run")
    args = parser.parse_args(argv)
    run = onnx_backend.Run.from_flags(args, on_gpu=True)
    providers = [("CUDAExecutionProvider", {"device_id": args.device_id}), "CPUExecutionProvider"]
    records = onnx_backend.run_backend(run, f"ONNX Runtime CUDA on {gpu_name(args.device_id)}", providers,
                                   device="cuda", device_id=args.device_id)
    if not args.no_cuda_graph:
        images, labels = load_test_set(args.data_dir, args.test_limit)
        logits, latencies = cuda_graph_latency(run.model, args.device_id, images, args.latency_runs)
        records.append(print_latency_block(
            f"ONNX Runtime CUDA, CUDA graph on {gpu_name(args.device_id)}", run.model, logits, labels, latencies,
            "device-resident: IOBinding with fixed buffers, enable_cuda_graph; each image copied into the fixed "
            "input before the clock starts", onnx_runtime.versions(), args.json))
    return records


if __name__ == "__main__":
    run(main)
