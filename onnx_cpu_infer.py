"""ONNX Runtime, CPU execution provider, on the dense graph (model.onnx) by default: the faster one
for single images and small batches; --routing loop (model.loop.onnx) for large batches."""

from moebench import onnx_backend
from moebench.cli import ArgumentParser, non_negative_int, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py", auto=True)
    parser.add_argument("--opt-level", choices=("disable", "basic", "extended", "all"), default="all",
                        help="ONNX Runtime graph optimisation level (default all)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="intra-op threads; 0 lets ONNX Runtime pick one per physical core")
    args = parser.parse_args(argv)
    return onnx_backend.run_backend(onnx_backend.Run.from_flags(args), "ONNX Runtime CPU", ["CPUExecutionProvider"],
                                {"opt_level": args.opt_level, "threads": args.threads},
                                {"options": f"graph optimisation {args.opt_level}, "
                                            f"intra-op threads {args.threads or 'auto'}"})


if __name__ == "__main__":
    run(main)
