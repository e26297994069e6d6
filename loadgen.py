"""MLPerf Inference LoadGen on the test set: SingleStream (90th-percentile latency) and Offline
(samples/s) for each CPU backend in-process, and Server (Poisson arrivals) against serve.py over HTTP
with batching off and on, 1 and 2 replicas, beside plain in-process ONNX Runtime as the no-server
baseline: for each, the highest offered QPS whose 99th-percentile latency stays under --p99-ms.
Accuracy mode checks LoadGen's accuracy log against the test labels for every system.

Writes results/loadgen/ (LoadGen's summary and detail logs), results/loadgen.{md,json,png}."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from data import add_data_args, load_split
from moebench import checkpoint, contract, harness, measure
from moebench.cli import (ArgumentParser, UserError, atomic_folder, non_negative_float, positive_int, require_module,
                          run, save_figure)
from moebench.compare import accuracy
from moebench.report import write as write_report
from moebench.runners import onnx_runtime, registry

SERVE_SETTINGS = {"serve.py, batching off, 1 replica": ["--max-batch-size", "1", "--replicas", "1"],
                  "serve.py, batching on, 1 replica": ["--max-batch-size", "32", "--replicas", "1"],
                  "serve.py, batching off, 2 replicas": ["--max-batch-size", "1", "--replicas", "2"],
                  "serve.py, batching on, 2 replicas": ["--max-batch-size", "32", "--replicas", "2"]}
BASELINE = "in-process ONNX Runtime, no server"


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
    parser.add_argument("--start-qps", type=non_negative_float, default=20.0,
                        help="first offered QPS of a ladder (default 20)")
    parser.add_argument("--qps-step", type=non_negative_float, default=1.6, help="ratio between ladder steps")
    parser.add_argument("--max-steps", type=positive_int, default=16, help="most QPS steps per ladder")
    parser.add_argument("--server-url", help="a running serve.py to measure in the Server scenario, instead of "
                                             "starting serve.py in each setting itself")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short runs, 3 ladder steps, ONNX Runtime and one serve.py setting")
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.qps_step <= 1 or args.start_qps <= 0 or args.p99_ms <= 0:
        parser.error("--qps-step must be > 1 and --start-qps, --p99-ms > 0")
    if args.quick:
        args.duration_s, args.max_steps = min(args.duration_s, 0.5), min(args.max_steps, 2)
        args.start_qps = max(args.start_qps, 200.0)
    return args


# ---------------------------------------------------------------- the systems

def in_process_backends(args, sources):
    """{name: make() -> predict(float32 pixels) -> logits} for the CPU backends, from the registry."""
    contract.check_onnx(args.model)
    names = [registry.REFERENCE]
    if not args.quick:
        contract.check_onnx(args.loop_model)
        names += ["ONNX Runtime CPU, loop, torchscript", "ONNX Runtime INT8 dynamic, dense",
                  f"OpenVINO CPU {registry.openvino_precision()}, loop", "OpenVINO CPU INT8 (NNCF), loop",
                  "PyTorch TorchScript (frozen) CPU, dense"]
    entries = registry.cpu_entries(sources.structure)[0]
    return {name: lambda e=registry.entry(name, entries): e.runner(sources).logits for name in names}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """serve.py in a subprocess, as a user starts it; stopped with Ctrl-C (SIGINT)."""

    def __init__(self, model, extra):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.process = subprocess.Popen([sys.executable, "serve.py", "--model", os.path.abspath(model),
                                         "--port", str(port), "--threads", "1", *extra],
                                        cwd=os.path.dirname(os.path.abspath(__file__)),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in self.process.stdout:
            if line.startswith("serving "):
                return
        raise UserError(f"serve.py did not start: {self.process.wait(30)} "
                        f"{self.process.stderr.read().strip().splitlines()[-1:]}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ---------------------------------------------------------------- runs

def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def accuracy_run(sut, images, labels, outdir):
    settings = harness.settings_for("Offline", "accuracy", 0)
    result = harness.run_test(sut, len(images), settings, outdir)
    classes = result.pop("classes")
    return {"accuracy": 100.0 * float((classes == labels).mean()), "refused": result["refused"]}


def single_stream(sut, predict, images, args, outdir):
    latency = np.median(measure.time_single_images(predict, images, 50))
    settings = harness.settings_for("SingleStream", "performance", int(1000 * args.duration_s), latency)
    return harness.run_test(sut, len(images), settings, outdir)


def offline(sut, predict, images, args, outdir):
    """LoadGen sizes its one Offline query from the expected QPS: an estimate that is low makes the
    run end before its minimum duration (INVALID), so the best of 3 warm passes, with 1.5x headroom."""
    measure.warm_up(predict, images, (1024,))
    qps = 1.5 * len(images) / min(measure.time_full_pass(predict, images, 1024) for _ in range(3))
    settings = harness.settings_for("Offline", "performance", int(1000 * args.duration_s), qps=qps)
    return harness.run_test(sut, len(images), settings, outdir)


def ladder(sut, count, args, outdir):
    """Server runs at rising offered QPS until one breaks the p99 bound (or is refused); keeps the
    summary of every step and the detail log of the best valid one."""
    steps, qps = [], args.start_qps
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.max_steps):
            settings = harness.settings_for("Server", "performance", int(1000 * args.duration_s),
                                            qps=qps, p99_ms=args.p99_ms)
            result = harness.run_test(sut, count, settings, os.path.join(scratch, f"{qps:.0f}"))
            # the bound is on the measured p99; LoadGen's own verdict (which also asks its early-stopping
            # test to be sure of the percentile) is kept beside it as "valid"
            result.update(offered_qps=qps, ok=result.get("p99_ns", float("inf")) <= args.p99_ms * 1e6
                          and result["refused"] == 0)
            steps.append(result)
            if not result["ok"]:
                break
            qps *= args.qps_step
        best = max((s for s in steps if s["ok"]), key=lambda s: s["offered_qps"], default=None)
        for step in steps:
            kept = os.path.join(outdir, f"server-{step['offered_qps']:.0f}qps")
            os.makedirs(kept, exist_ok=True)
            for name in harness.KEPT_LOGS if step is best else harness.KEPT_LOGS[:1]:
                shutil.copy(os.path.join(scratch, f"{step['offered_qps']:.0f}", name), kept)
    return {"steps": steps, "best_qps": best["offered_qps"] if best else None,
            "best_p99_ms": best["p99_ns"] / 1e6 if best else None}


def in_process_rows(args, sources, logs):
    images, labels = sources.test_set
    rows = {}
    for name, make in in_process_backends(args, sources).items():
        predict = make()
        direct = accuracy(measure.full_pass(predict, images, 1024), labels)
        sut = harness.InProcess(predict, images)
        folder = os.path.join(logs, slug(name))
        rows[name] = {"direct_accuracy": direct,
                      "loadgen": accuracy_run(sut, images, labels, os.path.join(folder, "accuracy")),
                      "single_stream": single_stream(sut, predict, images, args, os.path.join(folder, "singlestream")),
                      "offline": offline(sut, predict, images, args, os.path.join(folder, "offline"))}
        print(f"{name}: SingleStream p90 {rows[name]['single_stream']['p90_ns'] / 1e3:.1f} us, "
              f"Offline {rows[name]['offline']['samples_per_s']:,.0f} samples/s, accuracy in LoadGen "
              f"{rows[name]['loadgen']['accuracy']:.2f}% (the backend alone: {direct:.2f}%)", flush=True)
    return rows


def server_rows(args, images, labels, logs):
    """{setting: {ladder, accuracy}}: the in-process baseline and each serve.py setting."""
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    baseline_predict = onnx_runtime.runner(args.model).logits
    direct = accuracy(measure.full_pass(baseline_predict, images, 1024), labels)
    sut = harness.InProcess(baseline_predict, images, worker=True)
    rows = {BASELINE: {"ladder": ladder(sut, len(images), args, os.path.join(logs, slug(BASELINE))),
                       "direct_accuracy": direct}}
    report_ladder(BASELINE, rows[BASELINE])
    settings = ({f"serve.py at {args.server_url}": None} if args.server_url else
                dict(list(SERVE_SETTINGS.items())[1:2]) if args.quick else SERVE_SETTINGS)
    for name, extra in settings.items():
        server = ServeProcess(args.model, extra) if extra is not None else None
        url = server.url if server else args.server_url
        try:
            folder = os.path.join(logs, slug(name))
            checked = harness.OverHttp(url, pixels, per_request=100, connections=1)  # never overloads it
            over_http = accuracy_run(checked, images, labels, os.path.join(folder, "accuracy"))
            checked.close()
            sut = harness.OverHttp(url, pixels)
            rows[name] = {"ladder": ladder(sut, len(images), args, folder), "loadgen": over_http,
                          "direct_accuracy": direct}
            sut.close()
        finally:
            if server:
                server.stop()
        report_ladder(name, rows[name])
    return rows


def report_ladder(name, row):
    best = row["ladder"]["best_qps"]
    accuracy = f", accuracy over HTTP {row['loadgen']['accuracy']:.2f}%" if "loadgen" in row else ""
    print(f"{name}: " + (f"{best:.0f} QPS with p99 {row['ladder']['best_p99_ms']:.1f} ms" if best else
                         "no offered QPS met the bound") + accuracy, flush=True)


# ---------------------------------------------------------------- reports

def markdown(report):
    s = report["settings"]
    lines = [f"# LoadGen ({report['date']})", "",
             f"Machine: {report['machine']}; client (LoadGen) and server share it. MLPerf Inference LoadGen "
             f"{report['loadgen_version']}, {s['images']} test images, each performance run at least "
             f"{s['duration_s']:g} s (MLPerf's rules: 600 s).", ""]
    if report["in_process"]:
        lines += ["## In-process: SingleStream and Offline", "",
                  "| backend | SingleStream p90 (us) | SingleStream p50 (us) | Offline (samples/s) | "
                  "LoadGen VALID (SingleStream, Offline) | accuracy in LoadGen | the backend alone |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in report["in_process"].items():
            single, bulk = row["single_stream"], row["offline"]
            verdicts = ", ".join("yes" if run.get("valid") else "no" for run in (single, bulk))
            lines.append(f"| {name} | {single['p90_ns'] / 1e3:.1f} | {single['p50_ns'] / 1e3:.1f} | "
                         f"{bulk['samples_per_s']:,.0f} | {verdicts} | {row['loadgen']['accuracy']:.2f}% | "
                         f"{row['direct_accuracy']:.2f}% |")
    lines += ["", f"## Server: the highest offered QPS with p99 latency under {s['p99_ms']:g} ms", "",
              f"Poisson arrivals; offered QPS from {s['start_qps']:g} up by x{s['qps_step']:g} until a run's measured "
              "p99 breaks the bound or a request is refused (503). 'LoadGen VALID' is LoadGen's own verdict, "
              "which also asks its early-stopping test to be sure of the percentile from at least "
              f"{harness.SERVER_MIN_QUERIES} queries.", "",
              "| system | highest QPS under the bound | its p99 (ms) | its p50 (ms) | LoadGen VALID there | "
              "first failing step | accuracy over HTTP | the backend alone |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["server"].items():
        steps, best = row["ladder"]["steps"], row["ladder"]["best_qps"]
        good = next((st for st in steps if st["offered_qps"] == best), None)
        failed = next((st for st in steps if not st["ok"]), None)
        failure = (f"{failed['offered_qps']:.0f} QPS: p99 {failed.get('p99_ns', 0) / 1e6:.1f} ms"
                   + (f", {failed['refused']} refused" if failed["refused"] else "") if failed else "none")
        verdict = "yes" if good and good["valid"] else "no" if good else "-"
        accuracy = f"{row['loadgen']['accuracy']:.2f}%" if "loadgen" in row else "-"
        lines.append(f"| {name} | {best:.0f} | {good['p99_ns'] / 1e6:.1f} | {good['p50_ns'] / 1e6:.1f} | {verdict} | "
                     f"{failure} | {accuracy} | {row['direct_accuracy']:.2f}% |" if good else
                     f"| {name} | none | - | - | - | {failure} | {accuracy} | {row['direct_accuracy']:.2f}% |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, row in report["server"].items():
        steps = [st for st in row["ladder"]["steps"] if "p99_ns" in st]
        ax.plot([st["offered_qps"] for st in steps], [st["p99_ns"] / 1e6 for st in steps], marker="o", label=name)
    ax.axhline(report["settings"]["p99_ms"], color="grey", linestyle="--", label="p99 bound")
    ax.set(xscale="log", yscale="log", xlabel="offered QPS (Poisson arrivals)", ylabel="p99 latency (ms)",
           title=f"Server scenario, MLPerf LoadGen - {report['machine']} (client and server share it)")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    mlperf_loadgen = require_module("mlperf_loadgen", "loadgen.py")
    images_t, labels_t = load_split("test", args.data_dir, args.test_limit)
    images, labels = np.ascontiguousarray(images_t.numpy()), labels_t.numpy()
    with tempfile.TemporaryDirectory() as workdir, atomic_folder(os.path.join(args.out_dir, "loadgen")) as logs:
        sources = registry.Sources(args.checkpoint, workdir, (images, labels), args.data_dir,
                                   {"dense": args.model, "loop": args.loop_model}, calibration_images=300)
        in_process = in_process_rows(args, sources, logs)
        server = server_rows(args, images, labels, logs)
    report = {"machine": f"{measure.cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "loadgen_version": getattr(mlperf_loadgen, "__version__", "6.0.17"), "in_process": in_process,
              "server": server, "settings": {"images": len(images), "duration_s": args.duration_s,
                                             "p99_ms": args.p99_ms, "start_qps": args.start_qps,
                                             "qps_step": args.qps_step, "quick": args.quick}}
    print(write_report(report, args.out_dir, "loadgen", markdown, {"loadgen.png": plot}))
    return report


if __name__ == "__main__":
    run(main)
