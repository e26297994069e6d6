"""The block every backend script prints (and appends to --json as one line): what ran, on which
machine, its accuracy and its times; and a runner measured into one block per timing mode."""
import os
import platform
import sys
import time
from dataclasses import dataclass

from ..cli import append_json_line, positive_int, writable_file
from .clock import measure
from .machine import cpu_name


@dataclass(frozen=True)
class Settings:
    """How a backend script measures: the full pass's batch size, the single-image runs, a progress
    bar or not, and the JSON lines file to append to (or None)."""
    batch_size: int = 1024
    latency_runs: int = 1000
    progress: bool = True
    json_path: str = None

    @classmethod
    def from_flags(cls, args):
        """From the flags add_measure_args() adds."""
        return cls(args.batch_size, args.latency_runs, not args.quiet, args.json)


def add_measure_args(parser):
    parser.add_argument("--batch-size", type=positive_int, default=1024,
                        help="batch size for the full test set pass (default 1024)")
    parser.add_argument("--latency-runs", type=positive_int, default=1000,
                        help="single-image runs for the batch-1 latency percentiles (default 1000)")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--json", metavar="FILE", type=writable_file,
                        help="append the result as one JSON line to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from data import add_data_args  # the scripts' side only: a Ray worker imports this package without data.py
    add_data_args(parser)


def detail_lines(details):
    return [f"   {key:<13} {value}" if len(key) <= 13 else f"   {key} {value}" for key, value in details.items()]


def print_block(backend, model, result, versions, setup_s=None, details=None, json_path=None):
    """Print the block; append it to json_path if given; return it as a record. A result without a
    full pass ('test_set_s') is a batch-1 mode alone (a CUDA graph's replay)."""
    details = details or {}
    full_pass = "test_set_s" in result
    lines = [f"== {backend}",
             f"   model         {model}",
             "   versions      " + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f"; python {platform.python_version()}",
             f"   machine       {cpu_name()}, {os.cpu_count()} cores",
             *detail_lines(details)]
    if setup_s is not None:
        lines.append(f"   setup         {1e3 * setup_s:.1f} ms (model load, session creation or compilation; "
                     "not in the times below)")
    lines += [f"   accuracy      {result['accuracy']:.2f}% on {result['images']} test images"
              + ("" if full_pass else ", one at a time"),
              f"   timing        {result['timing']}"]
    if full_pass:
        lines.append(f"   test set      {1e3 * result['test_set_s']:.1f} ms at batch {result['batch_size']} "
                     f"({result['images_per_s']:,.0f} images/s), median of {result['test_set_runs']} passes "
                     "after warm-up")
    lines.append(f"   latency b=1   p50 {result['latency_p50_us']:.1f} us, p99 {result['latency_p99_us']:.1f} us "
                 f"over {result['latency_runs']} runs after warm-up")
    print("\n".join(lines), flush=True)
    measured = {k: v for k, v in result.items() if k != "logits"}
    return record_of(backend, model, {**({} if setup_s is None else {"setup_s": setup_s}), **measured,
                                      "details": details}, versions, json_path)


def record_of(backend, model, measured, versions, json_path):
    record = {"script": os.path.basename(sys.argv[0]), "backend": backend, "model": model, **measured,
              "versions": versions, "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if json_path:
        append_json_line(json_path, record)
    return record


def measure_runner(runner, test_set, settings, timings=("host",), model="", setup_s=None, details=None):
    """One block per timing mode of `runner` (its clock(timing)), headed by the runner's name; returns
    their records. The block's details are what the runner says ran (asked once it has run), then
    `details`."""
    images, labels = test_set
    records = []
    for timing in timings:
        result = measure(runner.clock(timing), images, labels, settings.batch_size, settings.latency_runs,
                         settings.progress)
        # asked after measuring: an engine that builds per batch size says what it built for these
        shown = {**{k: v for k, v in runner.describe().items() if k != "engine"}, **(details or {})}
        records.append(print_block(runner.name, model, result, runner.versions, setup_s, shown, settings.json_path))
    return records
