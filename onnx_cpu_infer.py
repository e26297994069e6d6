"""ONNX Runtime, CPU execution provider, on the dense graph (model.onnx) by default: the faster one
for single images and small batches; --routing loop (model.loop.onnx) for large batches. The session
is built and called in moebench/runners/onnx_runtime.py, runner()."""
import config
from moebench import backend_script
from moebench.cli import ArgumentParser, non_negative_int, run
from moebench.runners import onnx_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser, auto=True)
    backend_script.add_onnx_runtime_args(parser)
    parser.add_argument("--opt-level", choices=("disable", "basic", "extended", "all"), default="all",
                        help="ONNX Runtime graph optimisation level (default all)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="intra-op threads; 0 lets ONNX Runtime pick one per physical core")
    args = parser.parse_args(argv)
    settings = onnx_runtime.SessionSettings(args.opt_level, args.threads)
    auto = args.routing == "auto" and not args.model
    paths = ([config.onnx_path("dense"), config.onnx_path("loop")] if auto
             else [backend_script.model_path(args.model, args.routing)])
    measurement = backend_script.Measurement.from_flags(args, " and ".join(paths))
    details = {"options": f"graph optimisation {args.opt_level}, intra-op threads {args.threads or 'auto'}"}
    if args.kernels:
        details = onnx_runtime.with_kernels(details, paths, ["CPUExecutionProvider"], settings)
    if auto:
        return backend_script.measure(lambda: onnx_runtime.auto_runner(*paths, config.AUTO_LOOP_FROM,
                                                                       settings=settings), measurement, details)
    return backend_script.measure(lambda: onnx_runtime.runner(paths[0], settings=settings), measurement, details)


if __name__ == "__main__":
    run(main)
