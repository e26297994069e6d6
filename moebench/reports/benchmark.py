"""benchmark.py's report: the table of rows against the floor, each row on the roofline, the fastest
row for each use, and a picture of both."""
import numpy as np

from ..cli import save_figure
from ..measuring import roofline
from ..measuring.machine import machine_line

COLOURS = {"torch": "tab:orange", "onnx": "tab:blue", "fp16": "tab:cyan", "int8": "tab:green",
           "openvino": "tab:purple", "gpu": "tab:red", "dataloader": "tab:brown",
           "web": "tab:olive", "compiler": "tab:pink"}


def recommendation(rows, reference):
    """The fastest row for each use, among rows within 0.3 points of the reference row's accuracy."""
    reference = next(r for r in rows if r["key"] == reference)["name"]
    fp32 = next(r["accuracy"] for r in rows if r["name"] == reference)
    usable = [r for r in rows if r["accuracy"] >= fp32 - 0.3 and "latency_us" in r["model"]]
    latency = min(usable, key=lambda r: r["model"]["latency_us"]["p50"])
    bulk = min(usable, key=lambda r: r["model"]["best_test_set_ms"])
    return {"reference": reference,
            "batch-1 latency": {"row": latency["name"], "p50_us": latency["model"]["latency_us"]["p50"]},
            "bulk throughput": {"row": bulk["name"], "test_set_ms": bulk["model"]["best_test_set_ms"],
                                "batch": bulk["model"]["best_batch"]}}


def markdown(report):
    m = report["machine"]
    lines = [f"# Benchmark ({m['date']})", "", f"Machine: {machine_line(m)}.", "",
             f"{report['settings']['images']} test images. Every figure is the median of "
             f"{report['settings']['repeats']} timing blocks; each row's blocks alternate with the floor "
             f"({report['settings']['floor']}), so the ratio columns compare like with like. Batch-1 "
             f"latency: {report['settings']['latency_runs']} single-image runs per block. 'test set' columns: "
             "wall time for all test images at that batch size (the last one is the whole set as one batch). "
             f"'agrees' is the share of images whose class matches {report['reference']}'s.", "",
             "| row | accuracy | agrees | b=1 p50 / p90 / p99 (us) | b=1 vs floor | test set b=64 / 1024 / all (ms) "
             "| best images/s | best vs floor |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        model, lat = row["model"], row["model"].get("latency_us")
        times = " / ".join(f"{model['test_set_ms'][k]:.1f}" if k in model["test_set_ms"] else "-"
                           for k in ("64", "1024", str(report["settings"]["images"])))
        latency = (f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} | {row['vs_floor_b1']:.2f}x"
                   if lat else "- | -")
        agrees = f"{row['agreement']:.2f}%" if "agreement" in row else "-"
        lines.append(f"| {row['name']} | {row['accuracy']:.2f}% | {agrees} | {latency} | {times} | "
                     f"{model['images_per_s']:,.0f} (b={model['best_batch']}) | {row['vs_floor_test_set']:.2f}x |")
    beside = next((row for row in report["rows"] if row["name"] == report["reference"]), report["rows"][0])
    floor, lat = beside["floor"], beside["floor"]["latency_us"]
    lines.append(f"| floor (in the blocks of {beside['name']}) | - | - | {lat['p50']:.1f} / {lat['p90']:.1f} / "
                 f"{lat['p99']:.1f} | 1.00x | " + " / ".join(f"{v:.1f}" for v in floor["test_set_ms"].values())
                 + f" | {floor['images_per_s']:,.0f} (b={floor['best_batch']}) | 1.00x |")
    if any(row["group"] == "web" for row in report["rows"]):
        lines += ["", "The browser row's ratios are against the same floor MLP in onnxruntime-web in the same "
                  "browser, timed in alternating page loads."]
    lines += (roofline_lines(report) if report["peaks"] else []) + recommendation_lines(report) + what_ran_lines(report)
    if report["skipped"]:
        lines += ["", "Not measured here: " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def roofline_lines(report):
    peaks, s = report["peaks"], report["structure"]
    lines = ["", "## Roofline", "",
             "Peaks measured in this run (best of 5 square matrix products of size "
             f"{peaks['fp32']['size']}, 2 FLOPs per multiply-add): "
             + "; ".join(f"{p} {v['gflops']:.0f} GFLOP/s ({v['by']})" for p, v in peaks.items()) + ".",
             f"The activated path costs {roofline.activated_macs(s):,} multiply-adds per image (embedding, gate, "
             f"{s['TOP']} experts, head), {roofline.folded_macs(s):,} with the head folded into the experts' second "
             f"layers (exact); the dense graph computes {roofline.graph_macs(s, 'dense'):,}, the loop graph and the "
             f"fused operator {roofline.graph_macs(s, 'loop'):,}. 'best possible' is the folded path of all "
             f"{report['settings']['images']} images at the row's precision peak; '% of peak' counts the "
             "multiply-adds the row's graph really does.", "",
             "| row | precision | best test set (ms) | best possible (ms) | x best possible | % of peak |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(report["rows"], key=lambda r: r["roofline"]["vs_roofline"]):
        place = r["roofline"]
        lines.append(f"| {r['name']} | {place['precision']} | {r['model']['best_test_set_ms']:.1f} | "
                     f"{place['roofline_ms']:.1f} | {place['vs_roofline']:.2f}x | "
                     f"{100 * place['peak_fraction']:.0f}% |")
    if report.get("fused_profile"):
        lines += fused_profile_lines(report["fused_profile"], roofline.folded_macs(s), peaks["int8"]["gflops"])
    return lines


def fused_profile_lines(profile, macs_per_image, int8_gops):
    """Where the fused operator's time goes (measuring/fused_profile.py), in markdown: each SIMD path
    against its own limit, then its phases per thread and on one image."""
    if not profile["paths"]:
        return ["", "## Where the fused operator's time goes", "",
                "This CPU has none of the fused operator's SIMD paths (AMX, AVX-512 VNNI, AVX2): not profiled."]
    images, floor_ms = profile["images"], profile["memory_floor_ms"]
    roofline_ms = roofline.best_possible_ms(macs_per_image, images, int8_gops)
    out = ["", "## Where the fused operator's time goes", "",
           f"Each SIMD path this CPU has, on the whole test set ({images} images in one call, median of the calls) "
           f"and on one image (p50, from numpy to numpy), against its own limit: its product instruction alone "
           f"(register-only loops on every thread at once) doing the test set's {macs_per_image:,} multiply-adds "
           f"per image, plus the memory floor (reading the float32 images once on the same threads: "
           f"{floor_ms:.2f} ms). The int8 roofline (the run's int8 peak, ONNX Runtime's MatMulInteger) is "
           f"{roofline_ms:.2f} ms.", "",
           "| path | test set (ms) | its instruction alone (ms) | + memory floor (ms) | x that limit | "
           "x int8 roofline | one image p50 (us) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in profile["paths"]:
        name = path["instruction"]
        instruction_ms, gops = path["instruction_ms"][name], path["instruction_gops"][name]
        out.append(f"| {path['kernel']} | {path['wall_ms']:.2f} | {instruction_ms:.2f} ({name}, {gops:,.0f} GOP/s) | "
                   f"{path['limit_ms']:.2f} | {path['vs_limit']:.2f}x | {path['wall_ms'] / roofline_ms:.2f}x | "
                   f"{path['single_p50_us']:.2f} |")
    for path in profile["paths"]:
        out += phase_lines(path)
    return out


def phase_lines(path):
    """One path's phases: per thread on the test set (ms), and on one image (us)."""
    threads, phases = path["threads"], path["phases_ms"]
    busy = [sum(per_thread[t] for per_thread in phases.values()) for t in range(threads)]
    inside = sum(path["single_phases_us"].values())
    out = ["", f"{path['kernel']} ({path['label']}), clocked inside the operator: {path['wall_ms']:.2f} ms for the test "
           f"set on {threads} threads; one image {path['single_p50_us']:.2f} us, {inside:.2f} us of it inside the phases.",
           "", "| phase | " + " | ".join(f"thread {t}, test set (ms)" for t in range(threads)) + " | one image (us) |",
           "| --- | " + " | ".join("---" for _ in range(threads)) + " | --- |"]
    for phase, per_thread in phases.items():
        out.append(f"| {phase} | " + " | ".join(f"{ms:.3f}" for ms in per_thread)
                   + f" | {path['single_phases_us'][phase]:.2f} |")
    out.append("| waiting for the other threads, and the call outside the phases | "
               + " | ".join(f"{path['wall_ms'] - b:.3f}" for b in busy)
               + f" | {path['single_p50_us'] - inside:.2f} |")
    return out


def recommendation_lines(report):
    pick = report["recommendation"]
    latency, bulk = pick["batch-1 latency"], pick["bulk throughput"]
    return ["", "## Fastest for each use", "", f"Among rows within 0.3 points of the accuracy of {pick['reference']}:",
            f"- batch-1 latency: **{latency['row']}**, p50 {latency['p50_us']:.1f} us",
            f"- bulk throughput: **{bulk['row']}**, {bulk['test_set_ms']:.1f} ms for the test set at batch "
            f"{bulk['batch']}"]


def what_ran_lines(report):
    rows = [r for r in report["rows"] if "described" in r]
    lines = ["", "## What ran", "", "Read back from each engine after it was built.", "",
             "| row | engine | provider | precision | threads |", "| --- | --- | --- | --- | --- |"]
    return lines + [f"| {r['name']} | {d['engine']} | {d['provider']} | {d['precision']} | {d['threads']} |"
                    for r in rows for d in [r["described"]]]


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = report["rows"]
    names = [row["name"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(16, 0.42 * len(rows) + 2), sharey=True)
    panels = (("batch-1 latency p50 (us)", [row["model"].get("latency_us", {}).get("p50", np.nan) for row in rows],
               [row.get("floor", {}).get("latency_us", {}).get("p50", np.nan) for row in rows]),
              ("test set at the best batch size (ms)", [row["model"]["best_test_set_ms"] for row in rows],
               [row["floor"]["best_test_set_ms"] for row in rows]))
    for ax, (title, values, floors) in zip(axes, panels):
        ax.barh(names, values, color=[COLOURS.get(row["group"], "tab:gray") for row in rows])
        ax.scatter(floors, names, marker="|", s=300, color="black", label="floor (same blocks)")
        ax.set(xscale="log", title=title)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[1].legend(loc="lower right")
    m = report["machine"]
    fig.suptitle(f"MoE on MNIST, {report['settings']['images']} test images - {m['cpu']}, {m['cores']} cores, "
                 + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), fontsize=10)
    save_figure(fig, path)
