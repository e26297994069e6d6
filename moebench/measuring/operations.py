"""What loadgen.py measures of serve.py as operators run it, beside its rows: what the Prometheus
metrics cost (serve.py with and without them, both running, under wrk in turns), and the Open
Inference Protocol over gRPC under h2load beside the same protocol over HTTP under wrk, with every
test image's class over gRPC checked, and a model swapped while wrk sends. `start(flags)` starts
serve.py with extra flags and returns its ServerProcess."""
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..runners import onnx_runtime
from ..serving import grpc_api
from ..serving.requests import to_pixels
from ..serving.server_process import free_port
from . import clock, h2load, http_load, wrk
from .compare import accuracy

METRICS_ROUNDS = 5  # odd: the median is one turn's
CHECKED_IMAGES = 20  # what the checking client sends in each request while a model is swapped


def measured(start, model, new_model, images, labels, connections, duration_s):
    """{metrics_cost, grpc, swap} (each None where its load generator is not installed)."""
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    with onnx_runtime.runner(model) as baseline:
        expected = clock.full_pass(baseline.logits, images, 1024)
    found = {"metrics_cost": None, "grpc": None, "swap": None}
    if wrk.available():
        found["metrics_cost"] = metrics_cost(start, pixels, connections, duration_s)
        print(f"serve.py --replicas 2: {new_model} loaded, --model again (SIGHUP), {new_model} again, under wrk "
              f"at {connections[0]} connections", flush=True)
        process = start(("--replicas", "2"))
        try:
            found["swap"] = swap_under_wrk(process, new_model, pixels[:CHECKED_IMAGES],
                                           {"the model": expected[:CHECKED_IMAGES]}, connections[0], duration_s)
        finally:
            process.stop()
        print(f"  {found['swap']['wrk']['requests_per_s']:,.0f} requests/s, {found['swap']['wrk']['non_2xx']} refused, "
              f"{found['swap']['wrk']['errors']} failed; the checking client: {found['swap']['answers']}", flush=True)
    if wrk.available() and h2load.available():
        found["grpc"] = grpc_beside_http(start, pixels, labels, expected.argmax(1), connections, duration_s)
    return found


def metrics_cost(start, pixels, connections, wrk_duration_s):
    """The requests/s of serve.py with and without metrics (medians of METRICS_ROUNDS turns of half a
    wrk run each) and their ratio, per connection count."""
    print("what the Prometheus metrics cost: serve.py and serve.py --no-metrics, in turns under wrk", flush=True)
    started, turn_s = {}, max(1, round(wrk_duration_s / 2))  # wrk takes whole seconds
    try:
        for name, flags in (("serve.py", ()), ("serve.py --no-metrics", ("--no-metrics",))):
            started[name] = start(flags)
        runs = http_load.interleaved({name: process.url for name, process in started.items()},
                                     http_load.bodies(pixels[0])["own"], connections, turn_s, METRICS_ROUNDS, print)
    finally:
        for process in started.values():
            process.stop()
    medians = {count: {name: float(np.median(values)) for name, values in by_name.items()}
               for count, by_name in runs.items()}
    return {"rounds": METRICS_ROUNDS, "duration_s": turn_s,
            "runs": {str(count): by_name for count, by_name in runs.items()},
            "medians": {str(count): m for count, m in medians.items()},
            "ratio": {str(count): m["serve.py"] / m["serve.py --no-metrics"] for count, m in medians.items()}}


def grpc_beside_http(start, pixels, labels, expected, connections, duration_s):
    """serve.py --grpc-port: one image per request over HTTP/1.1 (wrk) and gRPC (h2load) at the same
    connection counts, and the classes over gRPC against `expected` (ONNX Runtime's)."""
    print("serve.py --grpc-port: the Open Inference Protocol over HTTP (wrk) and gRPC (h2load)", flush=True)
    grpc_port = free_port()
    process = start(("--grpc-port", str(grpc_port)))
    try:
        classes = grpc_api.classes_over_grpc(f"127.0.0.1:{grpc_port}", to_pixels(pixels))
        http = http_load.under_wrk(process.url, ("v2",), http_load.bodies(pixels[0]), connections, duration_s,
                                   print)["v2"]
        body = h2load.grpc_frame(grpc_api.infer_request(to_pixels(pixels[:1])).SerializeToString())
        grpc = []
        for count in connections:
            grpc.append(h2load.load(f"http://127.0.0.1:{grpc_port}/{grpc_api.INFER_PATH}", body, h2load.GRPC_HEADERS,
                                    count, duration_s))
            print(f"  h2load, gRPC, {count} connections: {grpc[-1]['requests_per_s']:,.0f} requests/s"
                  + (f", {grpc[-1]['failed']} failed" if grpc[-1]["failed"] else ""), flush=True)
    finally:
        process.stop()
    return {"http": http, "grpc": grpc, "accuracy": accuracy(classes, labels), "agreement": accuracy(classes, expected)}


def swap_under_wrk(process, new_model, pixels, expected, connections, duration_s):
    """While wrk sends single images to serve.py (`process`, a ServerProcess), and a checking client
    sends `pixels` again and again: load `new_model`, SIGHUP (--model again), load `new_model` again.
    {wrk: its result, answers: {name in `expected` (name: the logits that model gives `pixels`), or
    "neither": count of the checking client's answers}, failed: the checking client's non-200s,
    served_after: the file GET /v2/models/moe names at the end}."""
    url, stop = process.url, threading.Event()
    answers, failed = {**{name: 0 for name in expected}, "neither": 0}, []

    def check():
        while not stop.is_set():
            status, answer = post(url, pixels.tobytes(), "application/octet-stream")
            if status != 200:
                failed.append(status)
                continue
            logits = np.array([p["logits"] for p in answer["predictions"]])
            answers[next((name for name, rows in expected.items() if np.allclose(logits, rows, atol=1e-4)),
                         "neither")] += 1

    with ThreadPoolExecutor(2) as pool:
        loaded = pool.submit(wrk.load, url, pixels[:1].tobytes(), {"Content-Type": "application/octet-stream"},
                             connections, duration_s)
        checked = pool.submit(check)
        for step in ("load", "sighup", "load"):
            time.sleep(duration_s / 4)
            if step == "sighup":
                process.process.send_signal(signal.SIGHUP)
            else:
                status, answer = post(url + "v2/repository/models/moe/load",
                                      json.dumps({"parameters": {"path": str(new_model)}}).encode(), "application/json")
                if status != 200:
                    raise ValueError(f"loading {new_model} was answered {status}: {answer}")
        result = loaded.result()
        stop.set()
        checked.result()
    time.sleep(1.0)  # the other workers follow the last order
    served = post(url + "v2/models/moe", None, "")[1]
    return {"wrk": result, "checked_images": len(pixels), "answers": answers, "failed": len(failed),
            "served_after": (served.get("parameters") or {}).get("path")}


def post(url, body, content_type):
    """(status, parsed JSON) of a POST (a GET where body is None)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
