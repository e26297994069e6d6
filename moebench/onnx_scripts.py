"""What every ONNX backend script shares: its --model/--routing/--timing flags, and one printed
block (and JSON line) per timing mode once the script has chosen its providers."""
import os

import numpy as np
import onnx

import config

from . import contract, measure, viewer
from .cli import append_json_line
from .runners.onnx_runtime import (by_batch_size, clocks, create_session, provider_kernels, require_providers,
                                   session_options)

TIMINGS = ("host", "resident", "both")


def add_model_args(parser, what="ONNX model", timing=True, auto=False):
    parser.add_argument("--model", help=f"{what} from export_onnx.py (default: the --routing graph)")
    if timing:
        add_timing_arg(parser)
    parser.add_argument("--routing", choices=config.ROUTINGS + (("auto",) if auto else ()), default=config.ROUTING,
                        help=f"which exported graph to run when --model is not given (default {config.ROUTING}): "
                             f"{', '.join(f'{r} = {config.onnx_path(r)}' for r in config.ROUTINGS)}; dense is "
                             "faster for single images and small batches, loop for large batches"
                             + (f"; auto: {config.onnx_path('dense')} below batch {config.AUTO_LOOP_FROM}, "
                                f"{config.onnx_path('loop')} from there, in two sessions (in bulk slower than "
                                "the loop graph alone on a 2-core machine)" if auto else ""))
    measure.add_common_args(parser)
    viewer.add_netron_args(parser)


def add_timing_arg(parser):
    parser.add_argument("--timing", choices=TIMINGS,
                        help="host: session.run from host numpy arrays, as most users call it; resident: "
                             "IOBinding with inputs and outputs already on the provider's device; both "
                             "(default: host on CPU, both on CUDA)")


def parse_args(parser, argv, on_gpu=False):
    args = parser.parse_args(argv)
    args.large_model = None
    if args.routing == "auto" and not args.model:
        args.model, args.large_model = config.onnx_path("dense"), config.onnx_path("loop")
    args.model = args.model or config.onnx_path(args.routing)
    if "timing" in vars(args):
        args.timing = args.timing or ("both" if on_gpu else "host")
    return args




def report_latency_only(args, backend, logits, labels, latencies, timing):
    """A block for a mode that runs one batch size only (batch 1, as a CUDA graph captures it)."""
    result = {"accuracy": 100.0 * float((logits.argmax(1) == labels[:len(logits)]).mean()), "images": len(logits),
              "latency_p50_us": 1e6 * float(np.percentile(latencies, 50)),
              "latency_p99_us": 1e6 * float(np.percentile(latencies, 99)), "latency_runs": len(latencies)}
    lines = [f"== {backend}", f"   model         {args.model}",
             f"   machine       {measure.cpu_name()}, {os.cpu_count()} cores",
             f"   timing        {timing}",
             f"   accuracy      {result['accuracy']:.2f}% on {result['images']} test images, one at a time",
             f"   latency b=1   p50 {result['latency_p50_us']:.1f} us, p99 {result['latency_p99_us']:.1f} us "
             f"over {result['latency_runs']} runs after warm-up (the graph's capture)"]
    print("\n".join(lines), flush=True)
    record = {"backend": backend, "model": args.model, "timing": timing, **result, "versions": versions()}
    if args.json:
        append_json_line(args.json, record)
    return record


def versions():
    import onnxruntime as ort
    return measure.library_versions(ort, onnx, np)


def run_backend(args, backend_label, providers, options_kwargs=None, details=None, device="cpu", device_id=0):
    """Everything an ONNX backend script does once it has chosen its providers and model file:
    one printed block (and JSON line) per timing mode in args.timing; returns their records."""
    options_kwargs = options_kwargs or {}
    require_providers(providers)
    contract.require_file(args.model)
    images, labels = measure.load_test_set(args)
    paths = [args.model] + ([args.large_model] if args.large_model else [])
    # auto: the large-batch session does not spin, or its idle threads would slow the small-batch one
    made, setup_s = measure.timed(lambda: [create_session(path, providers, session_options(
        **options_kwargs, spinning=path != args.large_model)) for path in paths])
    backend = f"{backend_label} [providers: {', '.join(made[0].get_providers())}]"
    details = dict(details or {})
    for path, graph in zip(paths, ("", " (loop)") if args.large_model else ("",)):
        kernels = provider_kernels(path, providers, options_kwargs, images[:1])
        details[f"kernels on{' (dense)' if args.large_model and not graph else graph}"] = ", ".join(
            f"{p} {n}" for p, n in kernels.items())
    if args.large_model:
        details["routing"] = (f"auto: {args.model} for batches below {config.AUTO_LOOP_FROM}, {args.large_model} "
                              f"from {config.AUTO_LOOP_FROM} (here: batch 1 on the first, batch {args.batch_size} "
                              f"on the {'second' if args.batch_size >= config.AUTO_LOOP_FROM else 'first'})")
    records = []
    for chosen in zip(*(clocks(session, args.timing, device, device_id) for session in made)):
        runner = chosen[0] if len(chosen) == 1 else by_batch_size(*chosen, config.AUTO_LOOP_FROM)
        result = measure.measure(runner, images, labels, args.batch_size, args.latency_runs, not args.quiet)
        records.append(measure.report(args, backend, result, setup_s, versions(), details))
    if args.netron:
        viewer.serve(args.model, args)
    return records
