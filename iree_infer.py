"""IREE, the MLIR-based compiler and runtime: the exported ONNX model imported to MLIR, compiled ahead
of time for this CPU (llvm-cpu, the host's own instruction set) into a module that is cached, and run
by IREE's runtime. The synchronous driver (local-sync) takes small batches, where it is faster, and
the task-parallel one (local-task) large ones; --driver picks one of them throughout. IREE takes the
dense graph: the loop graph's unchosen experts make empty tensors, which its runtime refuses."""
from moebench import onnx_backend
from moebench.cli import ArgumentParser, run
from moebench.runners import iree_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "dense ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--driver", choices=iree_runtime.DRIVERS, default="auto",
                        help=f"auto: local-sync below batch {iree_runtime.SYNC_BELOW}, local-task from there "
                             "(default auto)")
    parser.add_argument("--target-cpu", default="host",
                        help="what --iree-llvmcpu-target-cpu compiles for (default host: this machine's CPU)")
    onnx_backend.add_cache_arg(parser, "compiled modules")
    args = parser.parse_args(argv)
    return onnx_backend.measure_made(
        onnx_backend.Run.from_flags(args), lambda model: iree_runtime.runner(model, args.cache_dir, args.driver,
                                                                             args.target_cpu),
        lambda runner: f"IREE {runner.versions['iree-base-runtime']} ({args.driver} driver, llvm-cpu)")


if __name__ == "__main__":
    run(main)
