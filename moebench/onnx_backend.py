"""An exported ONNX model measured as every ONNX Runtime script measures it: the --model, --routing
and --timing flags, the runner that runners/onnx_runtime.py makes, which kernels ran on which
provider, and one printed block (and JSON line) per timing mode."""
from dataclasses import dataclass

import config

from . import netron
from .measuring import block
from .measuring.clock import timed
from .runners import onnx_runtime
from .test_set import load_test_set

TIMINGS = ("host", "resident", "both")


def add_model_args(parser, what="ONNX model", timing=True, auto=False):
    parser.add_argument("--model", help=f"{what} from export_onnx.py (default: the --routing graph)")
    if timing:
        parser.add_argument("--timing", choices=TIMINGS,
                            help="host: session.run from host numpy arrays, as most users call it; resident: "
                                 "IOBinding with inputs and outputs already on the provider's device; both "
                                 "(default: host on CPU, both on CUDA)")
    parser.add_argument("--routing", choices=config.ROUTINGS + (("auto",) if auto else ()), default=config.ROUTING,
                        help=f"which exported graph to run when --model is not given (default {config.ROUTING}): "
                             f"{', '.join(f'{r} = {config.onnx_path(r)}' for r in config.ROUTINGS)}; dense is "
                             "faster for single images and small batches, loop for large batches"
                             + (f"; auto: {config.onnx_path('dense')} below batch {config.AUTO_LOOP_FROM}, "
                                f"{config.onnx_path('loop')} from there, in two sessions (in bulk slower than "
                                "the loop graph alone on a 2-core machine)" if auto else ""))
    block.add_measure_args(parser)
    netron.add_netron_args(parser)


@dataclass(frozen=True)
class Run:
    """What an ONNX Runtime script measures: the model file (and, for --routing auto, the loop graph's),
    the test images, the timing modes, how it measures, and where Netron shows the model (or None)."""
    model: str
    large_model: str = None
    data_dir: str = "data"
    test_limit: int = None
    timings: tuple = ("host",)
    settings: block.Settings = block.Settings()
    netron: tuple = None

    @classmethod
    def from_flags(cls, args, on_gpu=False):
        """From the flags add_model_args() added: the --routing graph when --model is not given."""
        model, large_model = args.model, None
        if args.routing == "auto" and not model:
            model, large_model = config.onnx_path("dense"), config.onnx_path("loop")
        timing = getattr(args, "timing", None) or ("both" if on_gpu else "host")
        return cls(model or config.onnx_path(args.routing), large_model, args.data_dir, args.test_limit,
                   ("host", "resident") if timing == "both" else (timing,), block.Settings.from_flags(args),
                   netron.asked(args))


def add_cache_arg(parser, what):
    from .runners.compiled import CACHE_ENV
    parser.add_argument("--cache-dir", help=f"where {what} are kept (default ${CACHE_ENV} or ~/.cache/moebench)")


def measure_made(run, make, label):
    """An engine's runner made from run.model by make(model) (its build timed apart), measured into
    one printed block; label(runner) heads it. Returns the block's record."""
    test_set = load_test_set(run.data_dir, run.test_limit)
    runner, setup_s = timed(lambda: make(run.model))
    return measured(run, runner, setup_s, test_set, label(runner), ("host",))[0]


def measured(run, runner, setup_s, test_set, backend, timings, model=None, details=None):
    """The runner measured into one printed block per timing mode, then let go; Netron afterwards if
    asked. Returns the blocks' records."""
    with runner:
        records = block.measure_runner(runner, test_set, run.settings, timings, backend, model or run.model, setup_s,
                                       details)
    netron.serve_if_asked(run.model, run.netron)
    return records


def kernels_details(paths, providers, options_kwargs, sample):
    """{'kernels on ...': 'provider count, ...'} for each graph: shows what fell back to the CPU."""
    details = {}
    for path, graph in zip(paths, (" (dense)", " (loop)") if len(paths) > 1 else ("",)):
        kernels = onnx_runtime.provider_kernels(path, providers, options_kwargs, sample)
        details[f"kernels on{graph}"] = ", ".join(f"{p} {n}" for p, n in kernels.items())
    return details


def run_backend(run, backend, providers, options_kwargs=None, details=None, device="cpu", device_id=0,
                precision="fp32"):
    """The model (or, for --routing auto, both graphs) in the ONNX Runtime runner that
    runners/onnx_runtime.py makes, measured in each of run.timings; returns the printed blocks' records."""
    options_kwargs = options_kwargs or {}
    onnx_runtime.require_providers(providers)
    test_set = load_test_set(run.data_dir, run.test_limit)
    if run.large_model:
        runner, setup_s = timed(lambda: onnx_runtime.auto_runner(run.model, run.large_model, config.AUTO_LOOP_FROM,
                                                                 **options_kwargs))
    else:
        runner, setup_s = timed(lambda: onnx_runtime.runner(run.model, backend, providers, onnx_runtime.session_options(
            **options_kwargs), precision, device, device_id))
    paths = [run.model] + ([run.large_model] if run.large_model else [])
    shown = {**(details or {}), **kernels_details(paths, providers, options_kwargs, test_set[0][:1])}
    batch = run.settings.batch_size
    if run.large_model:
        shown["routing"] = (f"auto: {run.model} for batches below {config.AUTO_LOOP_FROM}, {run.large_model} "
                            f"from {config.AUTO_LOOP_FROM} (here: batch 1 on the first, batch {batch} "
                            f"on the {'second' if batch >= config.AUTO_LOOP_FROM else 'first'})")
    return measured(run, runner, setup_s, test_set, f"{backend} [providers: {provider_list(runner)}]", run.timings,
                    " and ".join(paths), shown)


def provider_list(runner):
    session = runner.engine[0] if isinstance(runner.engine, tuple) else runner.engine
    return ", ".join(session.get_providers())
