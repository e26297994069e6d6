"""Systems under test for MLPerf Inference LoadGen, and one call that runs a LoadGen test and reads
its summary. A SUT answers each sample with the predicted class as a 4-byte int, so LoadGen's
accuracy log can be checked against the test labels."""
import array
import asyncio
import json
import os
import queue
import re
import shutil
import threading

import numpy as np

from .. import gc_settings

SCENARIOS = ("SingleStream", "Offline", "Server")
KEPT_LOGS = ("mlperf_log_summary.txt", "mlperf_log_detail.txt")
REFUSED = -1  # the class a sample gets when the server refused or failed it
# LoadGen's early stopping needs about 460 queries, all under the bound, before it can call a p99
# valid, and more when some are over it
SERVER_MIN_QUERIES = 1000


class Responder:
    """Completes LoadGen samples with their predicted classes (REFUSED when there is none)."""

    def __init__(self):
        import mlperf_loadgen as lg
        self.lg = lg
        self.refused = 0

    def complete(self, samples, classes):
        buffers = [array.array("i", [int(c)]) for c in classes]  # alive until QuerySamplesComplete returns
        self.refused += sum(1 for c in classes if c == REFUSED)
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(s.id, b.buffer_info()[0], b.itemsize)
                                      for s, b in zip(samples, buffers)])


class InProcess(Responder):
    """A backend called in this process. SingleStream and Offline run in LoadGen's issue thread
    (Offline in batches); Server queues each sample for one worker thread, one at a time, as a plain
    service without a batcher would."""

    def __init__(self, predict, images, batch_size=1024, worker=False):
        super().__init__()
        self.predict, self.images, self.batch_size = predict, images, batch_size
        self.queue = queue.Queue() if worker else None
        if worker:
            threading.Thread(target=self._work, daemon=True).start()

    def classes(self, indices):
        return self.predict(self.images[indices]).argmax(1)

    def issue(self, samples):
        if self.queue is not None:
            for sample in samples:
                self.queue.put(sample)
            return
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            self.complete(chunk, self.classes(np.array([s.index for s in chunk])))

    def _work(self):
        while True:
            sample = self.queue.get()
            self.complete([sample], self.classes(np.array([sample.index])))

    def close(self):
        pass


class OverHttp(Responder):
    """serve.py over HTTP: every sample is one POST of its 784 raw bytes, sent from an asyncio loop
    in its own thread so LoadGen's issue thread never waits; Offline sends `per_request` images per
    POST. A refused (503) or failed request completes its samples as REFUSED."""

    def __init__(self, url, images_uint8, per_request=1, connections=256):
        super().__init__()
        self.url, self.images, self.per_request = url, images_uint8, per_request
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.session = asyncio.run_coroutine_threadsafe(self._open(connections), self.loop).result()

    async def _open(self, connections):
        import aiohttp
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=60))

    async def _post(self, samples):
        body = self.images[[s.index for s in samples]].tobytes()
        try:
            async with self.session.post(self.url, data=body,
                                         headers={"Content-Type": "application/octet-stream"}) as response:
                if response.status != 200:
                    await response.read()
                    raise ValueError(response.status)
                answer = json.loads(await response.read())
            classes = [p["class"] for p in answer["predictions"]]
        except Exception:  # refused, failed or cut off: counted, never a made-up answer
            classes = [REFUSED] * len(samples)
        self.complete(samples, classes)

    def issue(self, samples):
        samples = list(samples)
        for start in range(0, len(samples), self.per_request):
            chunk = samples[start:start + self.per_request]
            self.loop.call_soon_threadsafe(lambda c=chunk: self.loop.create_task(self._post(c)))

    def close(self):
        asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def settings_for(scenario, mode, duration_ms, expected_latency_s=None, qps=None, p99_ms=None):
    import mlperf_loadgen as lg
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.min_duration_ms = duration_ms
    settings.min_query_count = 100
    if scenario == "SingleStream" and expected_latency_s:
        settings.single_stream_expected_latency_ns = max(1000, int(expected_latency_s * 1e9))
    if scenario == "Offline" and qps:
        settings.offline_expected_qps = qps
    if scenario == "Server":
        settings.min_query_count = SERVER_MIN_QUERIES
        settings.server_target_qps = qps
        settings.server_target_latency_ns = int(p99_ms * 1e6)
        settings.server_target_latency_percentile = 0.99
    return settings


def run_test(sut, count, settings, outdir, keep=KEPT_LOGS):
    """One LoadGen test; keeps LoadGen's logs named in `keep` in outdir; returns the summary's
    numbers and, in accuracy mode, the predicted class of every sample."""
    import tempfile

    import mlperf_loadgen as lg
    sut.refused = 0
    system = lg.ConstructSUT(sut.issue, lambda: None)
    samples = lg.ConstructQSL(count, count, lambda indices: None, lambda indices: None)
    with tempfile.TemporaryDirectory() as scratch:
        log_settings = lg.LogSettings()
        log_settings.log_output.outdir = scratch
        log_settings.log_output.copy_summary_to_stdout = False
        log_settings.enable_trace = False
        with gc_settings.settled():  # the client must not time its own pauses
            lg.StartTestWithLogSettings(system, samples, settings, log_settings)
        os.makedirs(outdir, exist_ok=True)
        for name in keep:
            shutil.copy(os.path.join(scratch, name), os.path.join(outdir, name))
        result = read_summary(os.path.join(scratch, "mlperf_log_summary.txt"))
        if settings.mode == lg.TestMode.AccuracyOnly:
            result["classes"] = read_accuracy_log(os.path.join(scratch, "mlperf_log_accuracy.json"), count)
    lg.DestroyQSL(samples)
    lg.DestroySUT(system)
    result["refused"] = sut.refused
    return result


SUMMARY_FIELDS = {"p50_ns": "50.00 percentile latency (ns)", "p90_ns": "90.00 percentile latency (ns)",
                  "p99_ns": "99.00 percentile latency (ns)", "samples_per_s": "Samples per second",
                  "completed_per_s": "Completed samples per second",
                  "scheduled_per_s": "Scheduled samples per second", "qps_with_overhead": "QPS w/ loadgen overhead"}


def read_summary(path):
    with open(path) as f:
        text = f.read()
    found = {"valid": "Result is : VALID" in text}
    for key, label in SUMMARY_FIELDS.items():
        match = re.search(re.escape(label) + r"\s*:\s*([0-9.]+)", text)
        if match:
            found[key] = float(match.group(1))
    return found


def read_accuracy_log(path, count):
    """{sample index: predicted class} from LoadGen's accuracy log (hex of each response)."""
    with open(path) as f:
        entries = json.load(f)
    classes = np.full(count, REFUSED, dtype=np.int64)
    for entry in entries:
        classes[entry["qsl_idx"]] = int.from_bytes(bytes.fromhex(entry["data"]), "little", signed=True)
    return classes
