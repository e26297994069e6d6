"""Prometheus metrics of serve.py's default server, in prometheus-client's multiprocess mode: every
uvicorn worker and every model process keeps its values in files of its own under one folder
(PROMETHEUS_MULTIPROC_DIR, made by serve.py for this run), and GET /metrics on any worker adds them
all up.

A request, and a model call, only add to plain Python counters and lists (Recorder); each worker and
model process moves them into its files once every FLUSH_S (a worker also before it answers a
scrape; a model process also when it has been idle that long), since an observation in the
multiprocess mode takes a lock and writes a mapped file, work the request path does not need to do
per request. So a scrape sees the other processes' last FLUSH_S late, never wrong.

    moe_requests_total{route, status}   answered requests (a 503 is a full queue, a 408 a body that
                                        did not arrive in time, 499 a client gone before its answer)
    moe_request_seconds{route}          from the request's arrival to its answer
    moe_queue_wait_seconds              from a request's arrival until its first images go to the model
    moe_model_call_seconds              one model call, measured where it runs (a worker or its model process)
    moe_batch_images                    images per model call
    moe_requests_waiting                requests in the batchers' queues now
    moe_abandoned_requests_total        requests whose client went away before their images were computed"""
import contextlib
import glob
import os
import re

import numpy as np

DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_S = 0.5
SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def enabled():
    return bool(os.environ.get(DIRECTORY_ENV))


class Metrics:
    """The metrics of this process (created once per process, after DIRECTORY_ENV is set)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram
        self.requests = Counter("moe_requests", "answered requests", ["route", "status"])
        self.request_seconds = Histogram("moe_request_seconds", "request arrival to answer", ["route"], buckets=SECONDS)
        self.queue_wait = Histogram("moe_queue_wait_seconds", "request arrival to its first model call",
                                    buckets=SECONDS)
        self.model_call = Histogram("moe_model_call_seconds", "one model call", buckets=SECONDS)
        self.batch_images = Histogram("moe_batch_images", "images per model call", buckets=IMAGES)
        self.waiting = Gauge("moe_requests_waiting", "requests in the batchers' queues", multiprocess_mode="livesum")
        self.abandoned = Counter("moe_abandoned_requests", "requests whose client went away before their images "
                                                           "were computed")


_METRICS = []


def metrics():
    if not _METRICS:
        _METRICS.append(Metrics())
    return _METRICS[0]


def add_observations(histogram, values):
    """Many observations at once: what histogram.observe(value) for each value would add."""
    if not values:
        return
    values = np.asarray(values, dtype=np.float64)
    bounds = histogram._upper_bounds  # prometheus-client keeps each bucket's own count, not cumulative ones
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(int(count))


class Recorder:
    """One worker's observations since its last flush (plain Python, cheap per request)."""

    def __init__(self):
        self.answered = {}  # (route, status) -> [count, [seconds, ...]]
        self.queue_waits, self.model_calls, self.batch_sizes = [], [], []
        self.abandoned = 0
        self.waiting = lambda: 0

    def request(self, route, status, seconds):
        entry = self.answered.get((route, status))
        if entry is None:
            entry = self.answered[(route, status)] = [0, []]
        entry[0] += 1
        entry[1].append(seconds)

    def model_call(self, images, seconds):
        self.batch_sizes.append(images)
        self.model_calls.append(seconds)

    def flush(self):
        into = metrics()
        answered, self.answered = self.answered, {}
        for (route, status), (count, seconds) in answered.items():
            into.requests.labels(route, str(status)).inc(count)
            add_observations(into.request_seconds.labels(route), seconds)
        for histogram, name in ((into.queue_wait, "queue_waits"), (into.model_call, "model_calls"),
                                (into.batch_images, "batch_sizes")):
            values = getattr(self, name)
            setattr(self, name, [])
            add_observations(histogram, values)
        if self.abandoned:
            into.abandoned.inc(self.abandoned)
            self.abandoned = 0
        into.waiting.set(self.waiting())


def forget_dead_processes(directory):
    """A live gauge's file of a process that is gone (a replaced worker) no longer counts."""
    from prometheus_client import multiprocess
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(re.search(r"_(\d+)\.db$", path).group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass


def exposition():
    """Every process's metrics, added up, in Prometheus's text format."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    directory = os.environ[DIRECTORY_ENV]
    forget_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)
    return generate_latest(registry)


def join_directory(directory):
    """Record into `directory` from this process on (a Ray Serve replica: serve.py made the folder for
    the run; on another node of a cluster it is made there, and holds that node's replicas). Call it
    before this process imports prometheus-client, which reads the folder's name at import."""
    os.makedirs(directory, exist_ok=True)
    os.environ[DIRECTORY_ENV] = directory


@contextlib.contextmanager
def multiprocess_directory(parent):
    """A fresh folder under `parent` for this run's metrics files, named to every process started
    inside the block (the multiprocess mode adds up whatever files the folder holds, so it must start
    empty)."""
    directory = os.path.join(parent, "metrics")
    os.makedirs(directory)
    os.environ[DIRECTORY_ENV] = directory
    try:
        yield directory
    finally:
        os.environ.pop(DIRECTORY_ENV, None)
