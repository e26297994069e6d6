"""What loadgen.py measures of serve.py as operators run it, beside its rows: what the Prometheus
metrics cost (serve.py with and without them, both running, under wrk in turns), and the Open
Inference Protocol over gRPC under h2load beside the same protocol over HTTP under wrk, with every
test image's class over gRPC checked. `start(flags)` starts serve.py with extra flags and returns its
ServerProcess."""
import numpy as np

from ..serving import grpc_api
from ..serving.requests import to_pixels
from ..serving.server_process import free_port
from . import h2load, http_load
from .compare import accuracy

METRICS_ROUNDS = 5  # odd: the median is one turn's


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
