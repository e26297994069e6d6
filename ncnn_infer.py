"""Tencent's ncnn, a mobile inference engine: the exported ONNX model converted once by pnnx (cached),
fp32, run by ncnn's CPU layers one image at a time (ncnn has no batch dimension), on one thread by
default. ncnn has no layers for the MoE gate (TopK, ScatterElements): the gate runs as a custom layer
written against ncnn's Python API, and the rest on ncnn's own layers. ncnn takes the dense graph."""
from moebench import onnx_backend
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import ncnn_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "dense ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads per layer (default 1)")
    onnx_backend.add_cache_arg(parser, "converted models")
    args = parser.parse_args(argv)
    return onnx_backend.measure_made(
        onnx_backend.Run.from_flags(args), lambda model: ncnn_runtime.runner(model, args.cache_dir, args.threads),
        lambda runner: f"ncnn {runner.versions['ncnn']} CPU ({args.threads} thread{'s' if args.threads > 1 else ''}, "
                       "the gate as a custom layer)")


if __name__ == "__main__":
    run(main)
