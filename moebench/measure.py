"""One way to measure every backend: same test images, warm-up excluded, same printed block.

A backend script builds a `predict(batch: np.ndarray) -> logits np.ndarray` (or a Clock, to time
with inputs already on a device) and hands it to `measure()`; `report()` prints the block and
appends the JSON line.
"""
import os
import platform
import statistics
import sys
import time

import numpy as np
from tqdm import tqdm

from . import compare
from .cli import append_json_line, positive_int, writable_file

TEST_SET_REPEATS = 5  # full-set timings: the median of this many passes
WARMUP_BATCHES = 3


def add_common_args(parser):
    parser.add_argument("--batch-size", type=positive_int, default=1024,
                        help="batch size for the full test set pass (default 1024)")
    parser.add_argument("--latency-runs", type=positive_int, default=1000,
                        help="single-image runs for the batch-1 latency percentiles (default 1000)")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--json", metavar="FILE", type=writable_file,
                        help="append the result as one JSON line to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from data import add_data_args  # the scripts' side only: a Ray worker imports this module without it
    add_data_args(parser)


def load_test_set(args):
    """Test images as a contiguous float32 numpy array (N, 1, 28, 28) and int64 labels, loaded once."""
    from data import load_split
    images, labels = load_split("test", args.data_dir, args.test_limit)
    return np.ascontiguousarray(images.numpy()), labels.numpy()


def timed(make):
    """(result of make(), seconds it took): for session or engine creation."""
    started = time.perf_counter()
    result = make()
    return result, time.perf_counter() - started


class Clock:
    """How one backend is timed. prepare() puts a batch where the backend reads it, before any
    clock starts; run() is what the clock times; sync() waits for the device before the clock is
    read; fetch() brings outputs back as numpy logits, after the clock. `timing` says which mode
    this is, for the printed block."""

    def __init__(self, run, prepare=None, sync=None, fetch=None, run_all=None,
                 timing="end to end from host numpy arrays"):
        self.run, self.timing = run, timing
        self.prepare = prepare or (lambda batch: batch)
        self.sync = sync or (lambda: None)
        self.fetch = fetch or (lambda output: output)
        self.run_all = run_all or (lambda batches: [run(batch) for batch in batches])


def as_runner(predict):
    """A plain predict(numpy batch) -> numpy logits, timed end to end from host arrays."""
    return predict if isinstance(predict, Clock) else Clock(predict)


def batches_of(runner, images, batch_size):
    return [runner.prepare(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def full_pass(predict, images, batch_size):
    """Logits for every image, as numpy."""
    runner = as_runner(predict)
    outputs = runner.run_all(batches_of(runner, images, batch_size))
    runner.sync()
    return np.concatenate([runner.fetch(output) for output in outputs])


def time_full_pass(predict, images, batch_size):
    runner = as_runner(predict)
    batches = batches_of(runner, images, batch_size)
    started = time.perf_counter()
    runner.run_all(batches)
    runner.sync()
    return time.perf_counter() - started


def time_single_images(predict, images, runs, start=0):
    """Seconds of each of `runs` single-image calls, cycling through the images."""
    runner = as_runner(predict)
    singles = [runner.prepare(images[i % len(images):i % len(images) + 1]) for i in range(start, start + runs)]
    latencies = []
    for single in singles:
        started = time.perf_counter()
        runner.run(single)
        runner.sync()
        latencies.append(time.perf_counter() - started)
    return latencies


def warm_up(predict, images, batch_sizes):
    for _ in range(WARMUP_BATCHES):
        for size in batch_sizes:
            full_pass(predict, images[:size], size)


def measure(predict, images, labels, batch_size, latency_runs, show_progress=True):
    """Accuracy on `images`, median full-set wall time at `batch_size`, batch-1 latency percentiles.
    Every timing follows a warm-up of the same shapes. `predict` is a Clock or a plain function."""
    batch_size = min(batch_size, len(images))
    warm_up(predict, images, (batch_size, 1))
    logits = full_pass(predict, images, batch_size)
    with tqdm(total=TEST_SET_REPEATS + 1, disable=None if show_progress else True, leave=False, unit="pass") as bar:
        totals = []
        for _ in range(TEST_SET_REPEATS):
            totals.append(time_full_pass(predict, images, batch_size))
            bar.update()
        latencies = time_single_images(predict, images, latency_runs)
        bar.update()
    return summary(logits, labels, batch_size, totals, latencies, as_runner(predict).timing)


def summary(logits, labels, batch_size, totals_s, latencies_s, timing):
    """What report() prints, from a run's logits, its full-set times and its single-image times."""
    total = statistics.median(totals_s)
    return {"accuracy": compare.accuracy(logits, labels), "images": len(logits), "batch_size": batch_size,
            "test_set_s": total, "test_set_runs": len(totals_s), "images_per_s": len(logits) / total,
            "latency_p50_us": 1e6 * float(np.percentile(latencies_s, 50)),
            "latency_p99_us": 1e6 * float(np.percentile(latencies_s, 99)),
            "latency_runs": len(latencies_s), "timing": timing, "logits": logits}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags (avx512f, avx512_bf16, ...) from /proc/cpuinfo; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def library_versions(*modules):
    return {module.__name__: module.__version__ for module in modules}


def report(args, backend, result, setup_s, versions, details=None):
    """Print the block every backend script shares; append it to --json if asked."""
    details = details or {}
    model = args.model + (f" and {args.large_model}" if getattr(args, "large_model", None) else "")
    lines = [f"== {backend}",
             f"   model         {model}",
             "   versions      " + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f"; python {platform.python_version()}",
             f"   machine       {cpu_name()}, {os.cpu_count()} cores",
             *(f"   {key:<13} {value}" if len(key) <= 13 else f"   {key} {value}" for key, value in details.items()),
             f"   setup         {1e3 * setup_s:.1f} ms (model load, session creation or compilation; "
             "not in the times below)",
             f"   accuracy      {result['accuracy']:.2f}% on {result['images']} test images",
             f"   timing        {result['timing']}",
             f"   test set      {1e3 * result['test_set_s']:.1f} ms at batch {result['batch_size']} "
             f"({result['images_per_s']:,.0f} images/s), median of {result['test_set_runs']} passes after warm-up",
             f"   latency b=1   p50 {result['latency_p50_us']:.1f} us, p99 {result['latency_p99_us']:.1f} us "
             f"over {result['latency_runs']} runs after warm-up"]
    print("\n".join(lines), flush=True)
    record = {"script": os.path.basename(sys.argv[0]), "backend": backend, "model": model,
              "setup_s": setup_s, **{k: v for k, v in result.items() if k != "logits"},
              "details": details, "versions": versions, "python": platform.python_version(),
              "cpu": cpu_name(), "cores": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.json:
        append_json_line(args.json, record)
    return record
