"""Apache TVM, the deep-learning compiler: the exported ONNX model imported into Relax and compiled
for this CPU (LLVM, the host's own instruction set) into a library that is cached, run by Relax's
virtual machine. Untuned by default (TVM's CPU pipeline, one library for every batch size);
--tune-trials N searches schedules with MetaSchedule for batch 1 and for --batch-size (static shapes;
other batches run in parts of that size, the last padded), and keeps the records and libraries in
the cache, so the search is paid once. Untuned, TVM takes both graphs (--routing loop); tuned, the
dense one. The library is compiled and called in moebench/runners/tvm_compiler.py, runner()."""
from moebench import backend_script
from moebench.cli import ArgumentParser, non_negative_int, run
from moebench.runners import tvm_compiler


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    parser.add_argument("--target-cpu", default="host",
                        help="the LLVM -mcpu to compile for (default host: this machine's CPU, as LLVM names it)")
    parser.add_argument("--tune-trials", type=non_negative_int, default=0,
                        help="MetaSchedule trials per compiled function, for batch 1 and for --batch-size (default "
                             "0: untuned; tuning takes minutes per batch size, once, then the cache serves it)")
    backend_script.add_cache_arg(parser, "compiled libraries and tuning records")
    args = parser.parse_args(argv)
    measurement = backend_script.Measurement.from_flags(args)
    return backend_script.measure(lambda: tvm_compiler.runner(measurement.model, args.cache_dir, args.target_cpu,
                                                              args.tune_trials, args.batch_size), measurement)


if __name__ == "__main__":
    run(main)
