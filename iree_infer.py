"""IREE, the MLIR-based compiler and runtime: the exported ONNX model imported to MLIR, compiled ahead
of time for this CPU (llvm-cpu, the host's own instruction set) into a module that is cached, and run
by IREE's runtime. The synchronous driver (local-sync) takes small batches, where it is faster, and
the task-parallel one (local-task) large ones; --driver picks one of them throughout. IREE takes the
dense graph: the loop graph's unchosen experts make empty tensors, which its runtime refuses.
The module is compiled and called in moebench/runners/iree_runtime.py, runner()."""
from moebench import backend_script
from moebench.cli import ArgumentParser, run
from moebench.runners import iree_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser, "dense ONNX model from export_onnx.py")
    parser.add_argument("--driver", choices=iree_runtime.DRIVERS, default="auto",
                        help=f"auto: local-sync below batch {iree_runtime.SYNC_BELOW}, local-task from there "
                             "(default auto)")
    parser.add_argument("--target-cpu", default="host",
                        help="what --iree-llvmcpu-target-cpu compiles for (default host: this machine's CPU)")
    backend_script.add_cache_arg(parser, "compiled modules")
    args = parser.parse_args(argv)
    measurement = backend_script.Measurement.from_flags(args)
    return backend_script.measure(lambda: iree_runtime.runner(measurement.model, args.cache_dir, args.driver,
                                                              args.target_cpu), measurement)


if __name__ == "__main__":
    run(main)
