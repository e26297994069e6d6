"""Alibaba's MNN, a mobile inference engine: the exported ONNX model converted once to an .mnn model
(cached), run through MNN's Module API on its CPU backend at fp32, on one thread (as on a phone's core)
or more; --weight-bits 8 stores the weights as int8 (MNN's weight quantization; the arithmetic stays
fp32). MNN takes both graphs."""
from moebench import netron, onnx_backend
from moebench.cli import ArgumentParser, positive_int, run
from moebench.measuring import block
from moebench.measuring.clock import timed
from moebench.runners import compiled, mnn_runtime
from moebench.test_set import load_test_set


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    onnx_backend.add_model_args(parser, "ONNX model from export_onnx.py", timing=False)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--weight-bits", type=int, choices=(0, 8), default=0,
                        help="8: weights stored as int8, computed in fp32 (default 0: fp32 weights)")
    parser.add_argument("--cache-dir", help=f"where converted models are kept (default ${compiled.CACHE_ENV} or "
                                            "~/.cache/moebench)")
    args = parser.parse_args(argv)
    model = onnx_backend.Run.from_flags(args).model
    test_set = load_test_set(args.data_dir, args.test_limit)
    runner, setup_s = timed(lambda: mnn_runtime.runner(model, args.cache_dir, args.threads, args.weight_bits))
    label = (f"MNN {runner.versions['mnn']} CPU ({args.threads} thread{'s' if args.threads > 1 else ''}"
             + (", int8 weights" if args.weight_bits else "") + ")")
    with runner:
        record = block.measure_runner(runner, test_set, block.Settings.from_flags(args), ("host",), label, model,
                                      setup_s)[0]
    netron.serve_if_asked(model, netron.asked(args))
    return record


if __name__ == "__main__":
    run(main)
