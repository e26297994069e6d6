"""IREE, the MLIR-based compiler and runtime: the exported ONNX model imported to MLIR, compiled ahead
of time for this CPU (llvm-cpu, the host's own instruction set) into a module that is cached, and run
by IREE's runtime. The synchronous driver (local-sync) takes small batches, where it is faster, and
the task-parallel one (local-task) large ones; --driver picks one of them throughout. IREE takes the
dense graph: the loop graph's unchosen experts make empty tensors, which its runtime refuses."""
from moebench import netron, onnx_backend
from moebench.cli import ArgumentParser, run
from moebench.measuring import block
from moebench.measuring.clock import timed
from moebench.runners import compiled, iree_runtime
from moebench.test_set import load_test_set


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "dense ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--driver", choices=iree_runtime.DRIVERS, default="auto",
                        help=f"auto: local-sync below batch {iree_runtime.SYNC_BELOW}, local-task from there "
                             "(default auto)")
    parser.add_argument("--target-cpu", default="host",
                        help="what --iree-llvmcpu-target-cpu compiles for (default host: this machine's CPU)")
    parser.add_argument("--cache-dir", help=f"where compiled modules are kept (default ${compiled.CACHE_ENV} or "
                                            "~/.cache/moebench)")
    args = parser.parse_args(argv)
    model = onnx_backend.Run.from_flags(args).model
    test_set = load_test_set(args.data_dir, args.test_limit)
    runner, setup_s = timed(lambda: iree_runtime.runner(model, args.cache_dir, args.driver, args.target_cpu))
    with runner:
        record = block.measure_runner(runner, test_set, block.Settings.from_flags(args), ("host",),
                                      f"IREE {runner.versions['iree-base-runtime']} ({args.driver} driver, llvm-cpu)",
                                      model, setup_s)[0]
    netron.serve_if_asked(model, netron.asked(args))
    return record


if __name__ == "__main__":
    run(main)
