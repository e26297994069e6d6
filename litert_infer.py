"""Google's LiteRT (the new name of TensorFlow Lite): the trained checkpoint converted by litert-torch
into .tflite files (cached; static shapes, so one per batch size, each converted before it is
timed) and run by LiteRT's interpreter with its XNNPACK CPU delegate, on every core by default;
--int8 quantizes each file with AI Edge Quantizer (int8 weights, activations quantized per call, as
its dynamic_wi8_afp32 recipe does). LiteRT takes the dense routing. The files are converted and called in
moebench/runners/litert_runtime.py, runner()."""
from moebench import backend_script, checkpoint
from moebench.cli import ArgumentParser, non_negative_int, run
from moebench.measuring import block
from moebench.runners import litert_runtime


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=checkpoint.DEFAULT_PATH, help="checkpoint from train.py")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads (default 0: one per core)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights and int8 arithmetic, activations quantized per call (default fp32)")
    block.add_measure_args(parser)
    backend_script.add_cache_arg(parser, "converted files")
    args = parser.parse_args(argv)
    return backend_script.measure(
        lambda: litert_runtime.runner(checkpoint.load_model(args.model, {"ROUTING": "dense"}, "--model")[0],
                                      args.cache_dir, args.threads, args.int8),
        backend_script.Measurement.from_flags(args, args.model))


if __name__ == "__main__":
    run(main)
