"""Tencent's ncnn, a mobile inference engine: the exported ONNX model converted once by pnnx (cached),
fp32, run by ncnn's CPU layers one image at a time (ncnn has no batch dimension), on one thread by
default. ncnn has no layers for the MoE gate (TopK, ScatterElements): the gate runs as a custom layer
written against ncnn's Python API, and the rest on ncnn's own layers. ncnn takes the dense graph.
The model is converted and called in moebench/runners/ncnn_runtime.py, runner()."""
from moebench import backend_script
from moebench.cli import ArgumentParser, positive_int, run
from moebench.runners import ncnn_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser, "dense ONNX model from export_onnx.py")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads per layer (default 1)")
    backend_script.add_cache_arg(parser, "converted models")
    args = parser.parse_args(argv)
    measurement = backend_script.Measurement.from_flags(args)
    return backend_script.measure(lambda: ncnn_runtime.runner(measurement.model, args.cache_dir, args.threads),
                                  measurement)


if __name__ == "__main__":
    run(main)
