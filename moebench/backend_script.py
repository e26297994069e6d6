"""What every backend script shares: the flags that name the model and how to measure it, and
measure(), the one way a script measures a runner: the runner made (its setup timed apart), one
printed block (and JSON line) per timing mode, the runner closed, then Netron if asked."""
from dataclasses import dataclass

import config

from . import netron
from .measuring import block
from .measuring.clock import full_pass, timed
from .measuring.compare import accuracy
from .test_set import load_test_set

TIMINGS = ("host", "resident", "both")


def add_model_args(parser, what="ONNX model from export_onnx.py", auto=False):
    """--model and --routing (the exported graph to read), the measuring flags, Netron's."""
    parser.add_argument("--model", help=f"{what} (default: the --routing graph)")
    parser.add_argument("--routing", choices=config.ROUTINGS + (("auto",) if auto else ()), default=config.ROUTING,
                        help=f"which exported graph to run when --model is not given (default {config.ROUTING}): "
                             f"{', '.join(f'{r} = {config.onnx_path(r)}' for r in config.ROUTINGS)}; dense is "
                             "faster for single images and small batches, loop for large batches"
                             + (f"; auto: {config.onnx_path('dense')} below batch {config.AUTO_LOOP_FROM}, "
                                f"{config.onnx_path('loop')} from there, in two sessions (in bulk slower than "
                                "the loop graph alone on a 2-core machine)" if auto else ""))
    block.add_measure_args(parser)
    netron.add_netron_args(parser)


def add_onnx_runtime_args(parser, kernels=False):
    """--timing and --kernels, for the ONNX Runtime scripts."""
    parser.add_argument("--timing", choices=TIMINGS,
                        help="host: session.run from host numpy arrays, as most users call it; resident: "
                             "IOBinding with inputs and outputs already on the provider's device; both "
                             "(default: host on CPU, both on CUDA)")
    parser.add_argument("--kernels", action="store_true", default=kernels,
                        help="also profile one run in a second session and print how many nodes each execution "
                             "provider took (shows what fell back to the CPU)"
                             + ("; on by default here (--no-kernels skips it)" if kernels else ""))
    if kernels:
        parser.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the kernel profile")


def add_cache_arg(parser, what):
    from .runners.compiled import CACHE_ENV
    parser.add_argument("--cache-dir", help=f"where {what} are kept (default ${CACHE_ENV} or ~/.cache/moebench)")


def model_path(model, routing):
    """The file --model names, or the --routing graph export_onnx.py wrote."""
    return model or config.onnx_path(routing)


@dataclass(frozen=True)
class Measurement:
    """How a script measures: the model it names in the block, the test images, the timing modes,
    the measuring settings, and where Netron shows the model afterwards (or None)."""
    model: str
    data_dir: str = "data"
    test_limit: int = None
    timings: tuple = ("host",)
    settings: block.Settings = block.Settings()
    netron: tuple = None

    @classmethod
    def from_flags(cls, args, model=None, on_gpu=False):
        """From the flags add_model_args() (or block.add_measure_args()) added; model defaults to
        the --model or --routing graph."""
        timing = getattr(args, "timing", None) or ("both" if on_gpu else "host")
        return cls(model or model_path(args.model, args.routing), args.data_dir, args.test_limit,
                   ("host", "resident") if timing == "both" else (timing,), block.Settings.from_flags(args),
                   netron.asked(args) if hasattr(args, "netron") else None)


def test_set_accuracy(runner, test_set):
    """The runner's accuracy on (images, labels), one untimed pass: what an INT8 row is compared with."""
    return accuracy(full_pass(runner.clock(), test_set[0], 1000), test_set[1])


def measure(make, measurement, details=None):
    """make() -> a runner, measured into one printed block per timing mode, then closed; Netron
    afterwards if asked. details: the block's extra lines, or a function of the runner that makes
    them once it is made. Returns the blocks' records."""
    test_set = load_test_set(measurement.data_dir, measurement.test_limit)
    runner, setup_s = timed(make)
    with runner:
        details = details(runner) if callable(details) else details
        records = block.measure_runner(runner, test_set, measurement.settings, measurement.timings,
                                       measurement.model, setup_s, details)
    netron.serve_if_asked(measurement.model, measurement.netron)
    return records
