"""How every backend is timed: the same test images, warm-up excluded, the median of whole passes
and single-image percentiles, from a Clock that says what it times."""
import statistics
import time

import numpy as np
from tqdm import tqdm

from .compare import accuracy

TEST_SET_REPEATS = 5  # full-set timings: the median of this many passes
WARMUP_BATCHES = 3


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


def by_batch_size(small, large, threshold):
    """A Clock that gives batches below `threshold` to `small` and the rest to `large`."""
    def pick(batch):
        return small if len(batch) < threshold else large

    def sync():
        small.sync()
        large.sync()
    return Clock(lambda prepared: (prepared[0], prepared[0].run(prepared[1])),
                 prepare=lambda batch: (pick(batch), pick(batch).prepare(batch)), sync=sync,
                 fetch=lambda done: done[0].fetch(done[1]), timing=small.timing)


def as_clock(predict):
    """A plain predict(numpy batch) -> numpy logits, timed end to end from host arrays."""
    return predict if isinstance(predict, Clock) else Clock(predict)


def batches_of(clock, images, batch_size):
    return [clock.prepare(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def full_pass(predict, images, batch_size):
    """Logits for every image, as numpy."""
    clock = as_clock(predict)
    outputs = clock.run_all(batches_of(clock, images, batch_size))
    clock.sync()
    return np.concatenate([clock.fetch(output) for output in outputs])


def time_full_pass(predict, images, batch_size):
    clock = as_clock(predict)
    batches = batches_of(clock, images, batch_size)
    started = time.perf_counter()
    clock.run_all(batches)
    clock.sync()
    return time.perf_counter() - started


def time_single_images(predict, images, runs, start=0):
    """Seconds of each of `runs` single-image calls, cycling through the images."""
    clock = as_clock(predict)
    singles = [clock.prepare(images[i % len(images):i % len(images) + 1]) for i in range(start, start + runs)]
    latencies = []
    for single in singles:
        started = time.perf_counter()
        clock.run(single)
        clock.sync()
        latencies.append(time.perf_counter() - started)
    return latencies


def seconds_of(call, repeats):
    """Seconds of each of `repeats` calls of call(), after one unmeasured."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


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
    return summary(logits, labels, batch_size, totals, latencies, as_clock(predict).timing)


def summary(logits, labels, batch_size, totals_s, latencies_s, timing):
    """What a printed block shows, from a run's logits, its full-set times and its single-image times."""
    total = statistics.median(totals_s)
    return {**latency_summary(logits, labels, latencies_s, timing), "batch_size": batch_size, "test_set_s": total,
            "test_set_runs": len(totals_s), "images_per_s": len(logits) / total, "logits": logits}


def latency_summary(logits, labels, latencies_s, timing):
    """The accuracy of `logits` and the single-image percentiles: a block for a batch-1 mode alone."""
    return {"accuracy": accuracy(logits, labels[:len(logits)]), "images": len(logits),
            "latency_p50_us": 1e6 * float(np.percentile(latencies_s, 50)),
            "latency_p99_us": 1e6 * float(np.percentile(latencies_s, 99)),
            "latency_runs": len(latencies_s), "timing": timing}
