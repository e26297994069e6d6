"""The servers over HTTP, measured two ways. First wrk, a C load generator fast enough not to be the
limit (a closed loop of 32 and 128 connections, one image per request): two bare HTTP servers with
no model (aiohttp, and uvicorn as serve.py runs it), serve.py with ONNX Runtime, the fused INT8
operator and OpenVINO, serve.py --ray, and Triton Inference Server (serve.py --triton), each as a
share of the faster bare server at the same connection count, and every served class checked
against ONNX Runtime's. Then MLPerf Inference LoadGen, whose Python client caps what it can measure
here: SingleStream and Offline for each CPU backend in process, and over HTTP SingleStream (one
request at a time) and Server (Poisson arrivals: the highest offered QPS whose p99 stays under
--p99-ms) for the bare servers, serve.py, serve.py --ray and in-process ONNX Runtime. Accuracy mode
checks LoadGen's accuracy log against the test labels for every system that has a model.

Writes results/loadgen/ (LoadGen's summary and detail logs), results/loadgen.{md,json,png}."""
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from data import add_data_args, load_split
from moebench import checkpoint, contract
from moebench.cli import (ArgumentParser, UserError, atomic_folder, non_negative_float, non_negative_int, positive_int,
                          require_module, run)
from moebench.measuring import clock, http_load, loadgen_systems as systems, operations, wrk
from moebench.measuring.compare import accuracy
from moebench.measuring.machine import cpu_name
from moebench.reports.files import write as write_report
from moebench.reports.loadgen import markdown, plot
from moebench.runners import onnx_runtime, registry
from moebench.serving.server_process import ServerProcess, free_port

BASELINE = "in-process ONNX Runtime, no server"


@dataclass(frozen=True)
class Server:
    """A system measured over HTTP: a server of bare_http.py with no model (`bare`: aiohttp or uvicorn,
    the faster of which, with a ladder, is the ceiling of this machine's HTTP path in the same run; or
    serve-py-no-model, serve.py's own application around a model that takes no time) or serve.py with
    `flags`; the protocols wrk drives it with; whether LoadGen's ladder measures it too (else a
    served model's answers are checked over the Open Inference Protocol); whether a smoke run has it."""
    name: str
    bare: str = None
    flags: tuple = ()
    protocols: tuple = ("own",)
    ladder: bool = True
    quick: bool = False


SERVERS = (Server("bare HTTP server, no model: aiohttp", bare="aiohttp", quick=True),
           Server("bare HTTP server, no model: uvicorn (serve.py's HTTP stack)", bare="uvicorn"),
           Server("bare HTTP server, no model: granian (Rust, the same ASGI handler)", bare="granian"),
           Server("serve.py (uvicorn, dynamic batching)", protocols=("own", "v2"), quick=True),
           Server("serve.py --http-server granian", flags=("--http-server", "granian"), ladder=False),
           Server("serve.py's own work, a model that takes no time (bare_http.py --server serve-py-no-model)",
                  bare="serve-py-no-model", ladder=False),
           Server("serve.py --ray (Ray Serve, HAProxy ingress)", flags=("--ray",)),
           Server("serve.py --backend fused-int8", flags=("--backend", "fused-int8"), ladder=False),
           Server("serve.py --backend openvino", flags=("--backend", "openvino"), ladder=False),
           Server("serve.py --triton (Triton Inference Server, python backend, ONNX Runtime)", flags=("--triton",),
                  protocols=("v2",), ladder=False))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="model.onnx", help="dense ONNX model (default model.onnx)")
    parser.add_argument("--loop-model", default="model.loop.onnx", help="loop-routing ONNX model")
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH, help="for the PyTorch row")
    parser.add_argument("--duration-s", type=non_negative_float, default=5.0,
                        help="LoadGen's minimum duration of each performance run (default 5 s; MLPerf's own "
                             "rules ask for 600 s)")
    parser.add_argument("--p99-ms", type=non_negative_float, default=50.0,
                        help="the Server scenario's bound on 99th-percentile latency (default 50 ms)")
    parser.add_argument("--start-qps", type=non_negative_float, default=100.0,
                        help="first offered QPS of a ladder (default 100)")
    parser.add_argument("--qps-step", type=non_negative_float, default=1.6, help="ratio between ladder steps")
    parser.add_argument("--max-steps", type=positive_int, default=16, help="most QPS steps per ladder")
    parser.add_argument("--refine-steps", type=non_negative_int, default=3,
                        help="steps between the last passing and the first failing QPS (default 3)")
    parser.add_argument("--server-url", help="a running serve.py to measure in the Server scenario, instead of "
                                             "starting serve.py in each setting itself")
    parser.add_argument("--wrk-duration-s", type=non_negative_float, default=8.0,
                        help="each wrk run's length (default 8 s)")
    parser.add_argument("--connections", type=positive_int, nargs="+", default=list(http_load.CONNECTIONS),
                        help="wrk's connection counts (default 32 128)")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short runs, 3 ladder steps, ONNX Runtime and one serve.py setting")
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.qps_step <= 1 or args.start_qps <= 0 or args.p99_ms <= 0:
        parser.error("--qps-step must be > 1 and --start-qps, --p99-ms > 0")
    if args.quick:
        args.duration_s, args.max_steps, args.refine_steps = min(args.duration_s, 0.5), min(args.max_steps, 2), 0
        args.wrk_duration_s = min(args.wrk_duration_s, 1.0)
        args.start_qps = max(args.start_qps, 200.0)
    return args


# ---------------------------------------------------------------- the systems

def in_process_entries(args, sources):
    """The registry's CPU entries LoadGen measures in process (a smoke run: the reference alone)."""
    contract.check_onnx(args.model)
    if args.quick:
        return [registry.entry(registry.REFERENCE)]
    contract.check_onnx(args.loop_model)
    return registry.in_report(registry.LOADGEN, sources.structure)[0]


# ---------------------------------------------------------------- runs

def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def accuracy_run(sut, images, labels, outdir, expected=None):
    """LoadGen's accuracy mode; with `expected` classes, also the share of answers equal to them."""
    settings = systems.settings_for("Offline", "accuracy", 0)
    result = systems.run_test(sut, len(images), settings, outdir)
    classes = result.pop("classes")
    found = {"accuracy": accuracy(classes, labels), "refused": result["refused"]}
    if expected is not None:
        found["agreement"] = accuracy(classes, expected)
    return found


def single_stream(sut, predict, images, args, outdir):
    latency = np.median(clock.time_single_images(predict, images, 50))
    settings = systems.settings_for("SingleStream", "performance", int(1000 * args.duration_s), latency)
    return systems.run_test(sut, len(images), settings, outdir)


def offline(sut, predict, images, args, outdir):
    """LoadGen sizes its one Offline query from the expected QPS: an estimate that is low makes the
    run end before its minimum duration (INVALID), so the best of 3 warm passes, with 1.5x headroom."""
    clock.warm_up(predict, images, (1024,))
    qps = 1.5 * len(images) / min(clock.time_full_pass(predict, images, 1024) for _ in range(3))
    settings = systems.settings_for("Offline", "performance", int(1000 * args.duration_s), qps=qps)
    return systems.run_test(sut, len(images), settings, outdir)


def ladder(sut, count, args, outdir):
    """Server runs at rising offered QPS until one breaks the p99 bound (or is refused), then
    --refine-steps more between the best passing and the first failing QPS (geometric midpoints);
    keeps the summary of every step and the detail log of the best passing one."""
    steps = []
    with tempfile.TemporaryDirectory() as scratch:
        def run_at(qps):
            settings = systems.settings_for("Server", "performance", int(1000 * args.duration_s),
                                            qps=qps, p99_ms=args.p99_ms)
            result = systems.run_test(sut, count, settings, os.path.join(scratch, f"{qps:.0f}"))
            # the bound is on the measured p99; LoadGen's own verdict (which also asks its early-stopping
            # test to be sure of the percentile) is kept beside it as "valid"
            result.update(offered_qps=qps, ok=result.get("p99_ns", float("inf")) <= args.p99_ms * 1e6
                          and result["refused"] == 0)
            steps.append(result)
            return result["ok"]
        qps = args.start_qps
        for _ in range(args.max_steps):
            if not run_at(qps):
                break
            qps *= args.qps_step
        for _ in range(args.refine_steps):
            good = max((s["offered_qps"] for s in steps if s["ok"]), default=None)
            bad = min((s["offered_qps"] for s in steps if not s["ok"] and s["offered_qps"] > (good or 0)), default=None)
            if good is None or bad is None:
                break
            run_at((good * bad) ** 0.5)
        best = max((s for s in steps if s["ok"]), key=lambda s: s["offered_qps"], default=None)
        for step in steps:
            kept = os.path.join(outdir, f"server-{step['offered_qps']:.0f}qps")
            os.makedirs(kept, exist_ok=True)
            for name in systems.KEPT_LOGS if step is best else systems.KEPT_LOGS[:1]:
                shutil.copy(os.path.join(scratch, f"{step['offered_qps']:.0f}", name), kept)
    steps.sort(key=lambda s: s["offered_qps"])
    return {"steps": steps, "best_qps": best["offered_qps"] if best else None,
            "best_p99_ms": best["p99_ns"] / 1e6 if best else None}


def in_process_rows(args, sources, logs):
    images, labels = sources.test_set
    rows = {}
    for entry in in_process_entries(args, sources):
        name = entry.label
        with entry.make(sources) as runner:
            predict = runner.logits
            direct = accuracy(clock.full_pass(predict, images, 1024), labels)
            sut = systems.InProcess(predict, images)
            folder = os.path.join(logs, slug(name))
            rows[name] = {"key": entry.key, "direct_accuracy": direct,
                          "loadgen": accuracy_run(sut, images, labels, os.path.join(folder, "accuracy")),
                          "single_stream": single_stream(sut, predict, images, args,
                                                         os.path.join(folder, "singlestream")),
                          "offline": offline(sut, predict, images, args, os.path.join(folder, "offline"))}
        print(f"{name}: SingleStream p90 {rows[name]['single_stream']['p90_ns'] / 1e3:.1f} us, "
              f"Offline {rows[name]['offline']['samples_per_s']:,.0f} samples/s, accuracy in LoadGen "
              f"{rows[name]['loadgen']['accuracy']:.2f}% (the backend alone: {direct:.2f}%)", flush=True)
    return rows


def start_server(server, args):
    port = free_port()
    if server.bare:
        command = [sys.executable, "-m", "moebench.serving.bare_http", "--server", server.bare, "--port", str(port)]
    else:
        command = [sys.executable, "serve.py", "--model", os.path.abspath(args.model), "--checkpoint",
                   os.path.abspath(args.checkpoint), "--port", str(port), "--threads", "1", *server.flags]
    return ServerProcess(command, os.path.dirname(os.path.abspath(__file__)), port)


def over_http(url, pixels, labels, args, folder, expected=None):
    """One server under LoadGen: its answers checked (never overloading it; with `expected`, the
    classes a model should give), one request at a time (SingleStream), and the Server ladder."""
    row = {}
    if expected is not None:
        checked = systems.OverHttp(url, pixels, per_request=100, connections=1)
        row["loadgen"] = accuracy_run(checked, pixels, labels, os.path.join(folder, "accuracy"), expected)
        checked.close()
    one_by_one = systems.OverHttp(url, pixels, connections=1)
    settings = systems.settings_for("SingleStream", "performance", int(1000 * args.duration_s), 0.001)
    row["single_stream"] = systems.run_test(one_by_one, len(pixels), settings, os.path.join(folder, "singlestream"))
    one_by_one.close()
    sut = systems.OverHttp(url, pixels)
    row["ladder"] = ladder(sut, len(pixels), args, folder)
    sut.close()
    return row


def server_row(server, args, pixels, labels, expected, logs, url=None):
    """One HTTP system, started here, or already running at `url`: wrk first, then LoadGen, or its
    answers checked over the Open Inference Protocol where it has no LoadGen ladder."""
    print(f"{server.name}:", flush=True)
    process = None if url else start_server(server, args)
    url = url or process.url
    row = {"direct_accuracy": None if server.bare else accuracy(expected, labels)}
    try:
        if wrk.available():
            row["wrk"] = http_load.under_wrk(url, server.protocols, http_load.bodies(pixels[0]), args.connections,
                                             args.wrk_duration_s, print)
        if server.ladder:
            row.update(over_http(url, pixels, labels, args, os.path.join(logs, slug(server.name)),
                                 None if server.bare else expected))
        elif not server.bare:
            classes = http_load.classes_over_v2(url, pixels)
            row["answers"] = {"accuracy": accuracy(classes, labels), "agreement": accuracy(classes, expected)}
            print(f"  answers over the Open Inference Protocol: {row['answers']['agreement']:.2f}% equal to ONNX "
                  f"Runtime's, accuracy {row['answers']['accuracy']:.2f}%", flush=True)
    finally:
        if process:
            process.stop()
    if server.ladder:
        report_ladder(server.name, row)
    return row


def measured_row(server, args, pixels, labels, expected, logs):
    """server_row(), or a row that says why not where a server without a ladder lacks its backend here."""
    try:
        return server_row(server, args, pixels, labels, expected, logs)
    except UserError as error:
        if server.ladder:
            raise
        print(f"  not measured: {error}", flush=True)  # said in the report, the rest goes on
        return {"not_measured": str(error)}


def server_rows(args, images, labels, logs):
    """{system: row}: the bare HTTP servers (the faster is the ceiling), the in-process baseline, and
    each server; and the ceiling's name."""
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    servers = [s for s in SERVERS if s.quick or not args.quick]
    bare = [s.name for s in servers if s.bare and s.ladder]  # the ceiling's candidates
    with onnx_runtime.runner(args.model) as baseline:
        expected = clock.full_pass(baseline.logits, images, 1024).argmax(1)
        rows = {s.name: server_row(s, args, pixels, labels, expected, logs) for s in servers if s.name in bare}
        sut = systems.InProcess(baseline.logits, images, worker=True)
        rows[BASELINE] = {"ladder": ladder(sut, len(images), args, os.path.join(logs, slug(BASELINE))),
                          "direct_accuracy": accuracy(expected, labels)}
    report_ladder(BASELINE, rows[BASELINE])
    if args.server_url:
        given = Server(f"serve.py at {args.server_url}")
        rows[given.name] = server_row(given, args, pixels, labels, expected, logs, args.server_url)
    else:
        rows.update({s.name: measured_row(s, args, pixels, labels, expected, logs) for s in servers
                     if s.name not in bare})
    http_load.shares(rows, bare)
    ceiling = max(bare, key=lambda name: rows[name]["ladder"]["best_qps"] or 0)
    best = rows[ceiling]["ladder"]["best_qps"]
    for row in rows.values():
        ladder_best = row.get("ladder", {}).get("best_qps")
        row["vs_ceiling"] = ladder_best / best if best and ladder_best else None
    return rows, ceiling


def report_ladder(name, row):
    best = row["ladder"]["best_qps"]
    accuracy = f", accuracy over HTTP {row['loadgen']['accuracy']:.2f}%" if "loadgen" in row else ""
    print(f"{name}: " + (f"{best:.0f} QPS with p99 {row['ladder']['best_p99_ms']:.1f} ms" if best else
                         "no offered QPS met the bound") + accuracy, flush=True)


def loadgen_version(module):
    """LoadGen's version as its package's metadata says it, or 'unknown'."""
    from importlib import metadata
    try:
        return getattr(module, "__version__", None) or metadata.version("mlcommons-loadgen")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    mlperf_loadgen = require_module("mlperf_loadgen", "loadgen.py")
    images_t, labels_t = load_split("test", args.data_dir, args.test_limit)
    images, labels = np.ascontiguousarray(images_t.numpy()), labels_t.numpy()
    with tempfile.TemporaryDirectory() as workdir, atomic_folder(os.path.join(args.out_dir, "loadgen")) as logs:
        sources = registry.Sources(args.checkpoint, workdir, (images, labels), args.data_dir,
                                   {"dense": args.model, "loop": args.loop_model}, calibration_images=300)
        in_process = in_process_rows(args, sources, logs)
        server, ceiling = server_rows(args, images, labels, logs)
        start = lambda flags: start_server(Server(" ".join(("serve.py", *flags)), flags=flags), args)  # noqa: E731
        operators = {} if args.quick or args.server_url else operations.measured(
            start, args.model, args.loop_model, images, labels, args.connections, args.wrk_duration_s)
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "loadgen_version": loadgen_version(mlperf_loadgen), "in_process": in_process,
              "server": server, "ceiling": ceiling, "wrk": wrk.available(), **operators,
              "settings": {"images": len(images), "duration_s": args.duration_s, "p99_ms": args.p99_ms,
                           "start_qps": args.start_qps, "qps_step": args.qps_step, "refine_steps": args.refine_steps,
                           "wrk_duration_s": args.wrk_duration_s, "connections": args.connections,
                           "quick": args.quick}}
    print(write_report(report, args.out_dir, "loadgen", markdown, {"loadgen.png": plot}))
    return report


if __name__ == "__main__":
    run(main)
