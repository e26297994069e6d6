"""The servers under wrk, the C load generator: each at several connection counts, with the body a
user of its API sends for one image (784 raw bytes for serve.py's own API and the bare servers; an
Open Inference Protocol request with the binary tensor extension for Triton, and for serve.py's /v2
beside it), and the answers of the servers that have no LoadGen accuracy run checked over that
protocol against ONNX Runtime's classes."""
import urllib.request

import numpy as np

from ..serving import kserve
from ..serving.requests import to_pixels
from . import wrk

CONNECTIONS = (32, 128)
V2_PATH = f"v2/models/{kserve.MODEL}/infer"


def bodies(first_image_uint8):
    """{protocol: (path, body, headers)} for one image."""
    v2_body, v2_headers = kserve.request_body(to_pixels(first_image_uint8))
    return {"own": ("", first_image_uint8.tobytes(), {"Content-Type": "application/octet-stream"}),
            "v2": (V2_PATH, v2_body, v2_headers)}


def under_wrk(url, protocols, requests, connections, duration_s, show):
    """{protocol: [wrk's result per connection count]}."""
    found = {}
    for protocol in protocols:
        path, body, headers = requests[protocol]
        found[protocol] = []
        for count in connections:
            result = wrk.load(url + path, body, headers, count, duration_s)
            found[protocol].append(result)
            show(f"  wrk, {protocol} API, {count} connections: {result['requests_per_s']:,.0f} requests/s, "
                 f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
                 + (f", {result['non_2xx']} refused" if result["non_2xx"] else "")
                 + (f", {result['errors']} failed" if result["errors"] else ""))
    return found


def interleaved(urls, request, connections, duration_s, rounds, show):
    """Two or more servers running at once, measured in turns (A, B, A, B, ...) at each connection
    count, so that a drift of the machine's speed during the run falls on all alike: {connection
    count: {name: [requests/s per round]}}. Each takes a warm-up run first."""
    path, body, headers = request
    for url in urls.values():
        wrk.load(url + path, body, headers, connections[0], min(duration_s, 2.0))
    found = {}
    for count in connections:
        found[count] = {name: [] for name in urls}
        for round_ in range(rounds):
            for name, url in urls.items():
                result = wrk.load(url + path, body, headers, count, duration_s)
                if result["non_2xx"] or result["errors"]:
                    raise ValueError(f"{name}: {result['non_2xx']} refused and {result['errors']} failed under wrk")
                found[count][name].append(result["requests_per_s"])
        medians = {name: float(np.median(runs)) for name, runs in found[count].items()}
        show(f"  {count} connections, medians of {rounds} turns: "
             + ", ".join(f"{name} {value:,.0f} requests/s" for name, value in medians.items()))
    return found


def classes_over_v2(url, images_uint8, batch=64):
    """The class of every image as an Open Inference Protocol server answers it, `batch` per request."""
    found = []
    for start in range(0, len(images_uint8), batch):
        body, headers = kserve.request_body(to_pixels(images_uint8[start:start + batch]))
        request = urllib.request.Request(url + V2_PATH, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = kserve.read_answer(response.read(), response.headers.get(kserve.HEADER_LENGTH))
        found.append(answer["logits"].argmax(1))
    return np.concatenate(found)


def shares(rows, bare_names):
    """Each row's requests/s over the faster bare server's at the same connection count, per protocol."""
    for row in rows.values():
        for protocol, results in row.get("wrk", {}).items():
            for index, result in enumerate(results):
                best = max((rows[name]["wrk"]["own"][index]["requests_per_s"] for name in bare_names
                            if "wrk" in rows[name]), default=None)
                result["vs_bare"] = result["requests_per_s"] / best if best else None
    return rows
