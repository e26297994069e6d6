"""loadgen.py's report: the in-process SingleStream and Offline table, the Server table with each
system's share of the HTTP ceiling, one-request-at-a-time latency over HTTP, and the p99 picture."""
import os

from ..cli import save_figure
from ..measuring import loadgen_systems


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
    lines += wrk_section(report) + metrics_section(report) + swap_section(report) + grpc_section(report)
    lines += ["", f"## LoadGen's Server scenario: the highest offered QPS with p99 latency under {s['p99_ms']:g} ms", "",
              "One image per request (784 raw bytes), Poisson arrivals, from LoadGen's Python SUT with an aiohttp "
              f"client on the same machine (its limit: the bare servers' row, well below what wrk measures them at). Offered QPS from {s['start_qps']:g} up by x{s['qps_step']:g} until a run's measured p99 "
              "breaks the bound or a request is refused (503), then "
              f"{s.get('refine_steps', 0)} steps between the last passing and the first failing QPS. "
              f"'x ceiling' is that QPS over the ceiling's, measured in the same run: the faster bare HTTP "
              f"server with no model ({report.get('ceiling', 'the bare server')}). "
              "'LoadGen VALID' is LoadGen's own verdict, which also asks its early-stopping test to be sure "
              f"of the percentile from at least {loadgen_systems.SERVER_MIN_QUERIES} queries.", "",
              "| system | highest QPS under the bound | x ceiling | its p99 (ms) | its p50 (ms) | LoadGen VALID there | "
              "first failing step | accuracy over HTTP | the backend alone |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["server"].items():
        if "ladder" not in row:
            continue
        steps, best = row["ladder"]["steps"], row["ladder"]["best_qps"]
        good = next((st for st in steps if st["offered_qps"] == best), None)
        failed = next((st for st in steps if not st["ok"]), None)
        failure = (f"{failed['offered_qps']:.0f} QPS: p99 {failed.get('p99_ns', 0) / 1e6:.1f} ms"
                   + (f", {failed['refused']} refused" if failed["refused"] else "") if failed else "none")
        verdict = "yes" if good and good["valid"] else "no" if good else "-"
        accuracy = f"{row['loadgen']['accuracy']:.2f}%" if "loadgen" in row else "-"
        alone = f"{row['direct_accuracy']:.2f}%" if row.get("direct_accuracy") is not None else "-"
        ratio = f"{row['vs_ceiling']:.2f}x" if row.get("vs_ceiling") else "-"
        lines.append(f"| {name} | {best:.0f} | {ratio} | {good['p99_ns'] / 1e6:.1f} | {good['p50_ns'] / 1e6:.1f} | "
                     f"{verdict} | {failure} | {accuracy} | {alone} |" if good else
                     f"| {name} | none | - | - | - | - | {failure} | {accuracy} | {alone} |")
    one_by_one = {name: row["single_stream"] for name, row in report["server"].items() if "single_stream" in row}
    if one_by_one:
        lines += ["", "## Over HTTP, one request at a time (SingleStream)", "",
                  "| system | p50 (us) | p90 (us) | p99 (us) | LoadGen VALID |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {r['p50_ns'] / 1e3:.0f} | {r['p90_ns'] / 1e3:.0f} | {r['p99_ns'] / 1e3:.0f} | "
                  f"{'yes' if r.get('valid') else 'no'} |" for name, r in one_by_one.items()]
    return "\n".join(lines) + "\n"


def wrk_section(report):
    s = report["settings"]
    if not report.get("wrk"):
        return ["", "## Servers under wrk", "", "Not measured: wrk is not installed here (bash tests/install_tools.sh)."]
    lines = ["", "## Servers under wrk, a C client: requests/s and latency, one image per request", "",
             f"wrk (Debian's 4.1.0): one thread, a closed loop of N keep-alive connections, {s['wrk_duration_s']:g} s "
             "per run, on the same cores as the server. 'own' is serve.py's API (784 raw bytes per image); 'v2' "
             "the Open Inference Protocol with the binary tensor extension (3,136 bytes of float32 pixels). "
             "'x bare' is requests/s over the faster bare server (no model) at the same connection count, in this "
             f"run. 'answers' is the share of the {s['images']:,} test images whose served class equals ONNX Runtime's "
             "(LoadGen's accuracy run, or the Open Inference Protocol in batches of 64).", "",
             "| server | API | connections | requests/s | x bare | p50 (ms) | p99 (ms) | refused / failed | answers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["server"].items():
        if "not_measured" in row:
            lines.append(f"| {name} | - | - | not measured: {row['not_measured']} | | | | | |")
        checked = row.get("answers") or row.get("loadgen") or {}
        answers = f"{checked['agreement']:.2f}%" if "agreement" in checked else "-"
        for protocol, results in row.get("wrk", {}).items():
            for r in results:
                ratio = f"{r['vs_bare']:.2f}x" if r.get("vs_bare") else "-"
                lines.append(f"| {name} | {protocol} | {r['connections']} | {r['requests_per_s']:,.0f} | {ratio} | "
                             f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} / {r['errors']} | {answers} |")
    return lines


def metrics_section(report):
    cost = report.get("metrics_cost")
    if not cost:
        return []
    lines = ["", "## What the Prometheus metrics cost", "",
             f"serve.py and serve.py --no-metrics running side by side, measured in turns under wrk ({cost['rounds']} "
             f"turns of {cost['duration_s']:g} s each, single-image requests), so that the machine's drift during "
             "the run falls on both alike; medians of the turns.", "",
             "| connections | serve.py (requests/s) | serve.py --no-metrics (requests/s) | with / without |",
             "| --- | --- | --- | --- |"]
    for count, medians in cost["medians"].items():
        with_, without = medians["serve.py"], medians["serve.py --no-metrics"]
        lines.append(f"| {count} | {with_:,.0f} | {without:,.0f} | {cost['ratio'][count]:.2f}x |")
    return lines


def swap_section(report):
    swap = report.get("swap")
    if not swap:
        return []
    run, answers = swap["wrk"], swap["answers"]
    return ["", "## A model swapped under load", "",
            f"serve.py with 2 workers under wrk ({run['connections']} connections, {run['duration_s']:.0f} s, single "
            "images) while it is told to load the loop graph (POST /v2/repository/models/moe/load), to load "
            "--model again (SIGHUP), and the loop graph once more; beside wrk, a client sends the same "
            f"{swap['checked_images']} images again and again and checks each answer against ONNX Runtime's "
            "logits for them (both graphs give the same).", "",
            "| wrk: requests/s | refused (non-2xx) | failed | checking client: answers equal to the model's | "
            "other answers | refused or failed | served at the end |", "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {run['requests_per_s']:,.0f} | {run['non_2xx']} | {run['errors']} | {answers['the model']} | "
            f"{answers['neither']} | {swap['failed']} | {os.path.basename(swap['served_after'] or '-')} |"]


def grpc_section(report):
    found = report.get("grpc")
    if not found:
        return []
    lines = ["", "## The Open Inference Protocol over gRPC and over HTTP", "",
             "serve.py --grpc-port, one image per request (FP32 [1, 1, 28, 28] raw tensor contents): gRPC under h2load "
             "(HTTP/2, one stream per connection), HTTP/1.1 under wrk (the binary tensor extension), each a closed "
             f"loop of that many connections. Every test image's class over gRPC: {found['agreement']:.2f}% equal to "
             f"ONNX Runtime's, accuracy {found['accuracy']:.2f}%.", "",
             "| connections | gRPC, h2load (requests/s) | HTTP, wrk (requests/s) | gRPC / HTTP |", "| --- | --- | --- | --- |"]
    for grpc, http in zip(found["grpc"], found["http"]):
        lines.append(f"| {grpc['connections']} | {grpc['requests_per_s']:,.0f} | {http['requests_per_s']:,.0f} | "
                     f"{grpc['requests_per_s'] / http['requests_per_s']:.2f}x |")
    return lines


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, row in report["server"].items():
        steps = [st for st in row.get("ladder", {}).get("steps", []) if "p99_ns" in st]
        if not steps:
            continue
        ax.plot([st["offered_qps"] for st in steps], [st["p99_ns"] / 1e6 for st in steps], marker="o", label=name)
    ax.axhline(report["settings"]["p99_ms"], color="grey", linestyle="--", label="p99 bound")
    ax.set(xscale="log", yscale="log", xlabel="offered QPS (Poisson arrivals)", ylabel="p99 latency (ms)",
           title=f"Server scenario, MLPerf LoadGen - {report['machine']} (client and server share it)")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
