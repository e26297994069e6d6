"""How cost grows with the work: (a) per-image cost against batch size for the trained model on the
best rows of each engine; (b) per-image cost as the model grows (EXPERTS and HIDDEN_SIZE, TOP 2,
random weights: only time matters), dense against loop routing against the best engine, beside
the roofline of the activated path; (c) models whose experts no longer fit the caches (EMB_SIZE 1024,
HIDDEN_SIZE 2048, EXPERTS 8 to 64), every engine in fp32 and INT8 and the fused operator, beside the
compute roofline and the memory-bandwidth one (the weights a batch must read, at the bandwidth this
run measures). Writes results/sweep.md, sweep.json, sweep_batch.png, sweep_size.png, sweep_large.png."""
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

import config
from data import add_data_args, load_split
from moe import build_model
from moebench import checkpoint
from moebench.measuring import clock, roofline
from moebench.measuring.machine import cpu_name
from moebench.cli import ArgumentParser, positive_int, run, save_figure
from moebench.reports.files import write as write_report
from moebench.runners import registry

BATCH_SIZES = (1, 4, 16, 64, 256, 1024, 4096, 10000)
EXPERTS = (8, 16, 32, 64)
HIDDEN_SIZES = (256, 1024)
SIZE_IMAGES = 2048  # images per bulk timing in the model-size sweep
# Past the caches: each expert is 4.2M weights (4 MB in int8, 17 MB in fp32), so every batch of 256 reads
# 34-268 MB of int8 experts or 134 MB-1.1 GB of fp32 ones, past any last-level cache. HIDDEN_SIZE 4096 at 64
# experts would hold 2.1 GB of fp32 weights, past the 2 GB an ONNX file holds without external data.
LARGE = {"EMB_SIZE": 1024, "HIDDEN_SIZE": 2048}
LARGE_EXPERTS = (8, 16, 32, 64)
LARGE_IMAGES, LARGE_SINGLES = 256, 20  # one bulk batch of 256 images; single images, each timed


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timings per point; the median (default 3)")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few batch sizes, small models")
    add_data_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- timing

def per_image_us(predict, images, batch_size, repeats):
    """Median over `repeats` of the wall time per image for a pass at `batch_size`, after a warm-up."""
    images = images[:max(min(len(images), 2048), batch_size)]
    clock.warm_up(predict, images, (min(batch_size, len(images)),))
    times = [clock.time_full_pass(predict, images, batch_size) for _ in range(repeats)]
    return 1e6 * statistics.median(times) / len(images)


def batch_sweep(entries, sources, sizes, repeats):
    """{engine: {batch size: us per image}}."""
    curves, images = {}, sources.test_set[0]
    for entry in tqdm(entries, desc="batch sweep", unit="engine", disable=None):
        with entry.make(sources) as runner:
            curves[entry.label] = {str(size): per_image_us(runner.clock(), images, size, repeats) for size in sizes
                                   if size <= len(images)}
    return curves


def random_model(structure, seed=0):
    """Random weights with a random gate (the trained gate starts at zero), so routing spreads."""
    torch.manual_seed(seed)
    model = build_model(structure).eval()
    with torch.no_grad():
        model.moe.w_gate.normal_(0, 1)
    return model


def large_sweep(workdir, test_set, structure, experts, repeats):
    """[{EXPERTS, engine, bulk_us (one batch of the test set), b1_us, the structure}] for models larger
    than the caches; `structure` gives EMB_SIZE and HIDDEN_SIZE."""
    points, pixels = [], test_set[0]
    for e in tqdm(experts, desc="large-model sweep", unit="model", disable=None):
        s = {**config.defaults(), **structure, "EXPERTS": e}
        folder = os.path.join(workdir, f"large-e{e}")
        os.makedirs(folder)
        sources = registry.Sources.of_model(random_model(s), s, folder, test_set)
        for entry in registry.in_report(registry.LARGE_SWEEP, s)[0]:
            with entry.make(sources) as runner:
                points.append({"EXPERTS": e, "EMB_SIZE": s["EMB_SIZE"], "HIDDEN_SIZE": s["HIDDEN_SIZE"],
                               "engine": entry.label, "precision": entry.precision, "routing": entry.routing,
                               "bulk_us": per_image_us(runner.clock(), pixels, len(pixels), repeats),
                               "b1_us": per_image_us(runner.clock(), pixels[:LARGE_SINGLES], 1, repeats)})
        del sources
        shutil.rmtree(folder)  # a large model's exports take gigabytes of disk
    return points


def size_sweep(workdir, test_set, experts, hidden_sizes, repeats):
    """[{EXPERTS, HIDDEN_SIZE, engine, bulk_us, b1_us, activated_macs, graph_macs}]."""
    points, pixels = [], test_set[0]
    configs = [(e, h) for h in hidden_sizes for e in experts]
    for e, h in tqdm(configs, desc="size sweep", unit="model", disable=None):
        structure = {**config.defaults(), "EXPERTS": e, "HIDDEN_SIZE": h}
        folder = os.path.join(workdir, f"e{e}h{h}")
        os.makedirs(folder)
        sources = registry.Sources.of_model(random_model(structure), structure, folder, test_set)
        for entry in registry.in_report(registry.SIZE_SWEEP, structure)[0]:
            with entry.make(sources) as runner:
                points.append({"EXPERTS": e, "HIDDEN_SIZE": h, "engine": entry.label,
                               "bulk_us": per_image_us(runner.clock(), pixels, 1024, repeats),
                               "b1_us": per_image_us(runner.clock(), pixels[:200], 1, repeats),
                               "activated_macs": roofline.activated_macs(structure),
                               "graph_macs": roofline.graph_macs(structure, entry.routing)})
    return points


# ---------------------------------------------------------------- pictures

def plot_batches(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, curve in report["batch"].items():
        ax.plot([int(b) for b in curve], list(curve.values()), marker="o", label=name)
    peaks, macs = report["peaks"], report["activated_macs"]
    for precision, style in (("fp32", ":"), ("bf16", "--"), ("int8", "-.")):
        ax.axhline(1e6 * 2 * macs / (peaks[precision]["gflops"] * 1e9), color="grey", linestyle=style,
                   label=f"roofline, activated path at the {precision} peak")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="microseconds per image",
           title=f"Per-image cost against batch size (trained model, {report['machine']})")
    readable_log_axes(ax)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_sizes(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hidden_sizes = sorted({p["HIDDEN_SIZE"] for p in report["size"]})
    fig, axes = plt.subplots(2, len(hidden_sizes), figsize=(7 * len(hidden_sizes), 10), squeeze=False)
    bf16 = report["peaks"]["bf16"]["gflops"]
    for column, hidden in enumerate(hidden_sizes):
        points = [p for p in report["size"] if p["HIDDEN_SIZE"] == hidden]
        for row, (key, what) in enumerate((("bulk_us", "bulk, batch 1024"), ("b1_us", "batch 1"))):
            ax = axes[row][column]
            for engine in dict.fromkeys(p["engine"] for p in points):
                mine = [p for p in points if p["engine"] == engine]
                ax.plot([p["EXPERTS"] for p in mine], [p[key] for p in mine], marker="o", label=engine)
            experts = sorted({p["EXPERTS"] for p in points})
            floor = {p["EXPERTS"]: 1e6 * 2 * p["activated_macs"] / (bf16 * 1e9) for p in points}
            ax.plot(experts, [floor[e] for e in experts], color="grey", linestyle="--",
                    label="roofline, activated path at the bf16 peak")
            ax.set(xscale="log", yscale="log", xlabel="EXPERTS (TOP 2)", ylabel="microseconds per image",
                   title=f"HIDDEN_SIZE {hidden}, {what}", xticks=experts, xticklabels=[str(e) for e in experts])
            readable_log_axes(ax)
            ax.legend(fontsize="small")
    fig.suptitle(f"Per-image cost as the model grows (random weights; {report['machine']})")
    save_figure(fig, path)


def large_rooflines(report, batch):
    """{line label: us per image at each EXPERTS} for the large panel at batch `batch`: the
    activated path at the int8 peak, and the weights the batch must read at the measured bandwidth, in
    int8 as the fused operator holds them (folded) and in fp32 as the graphs do."""
    points = {p["EXPERTS"]: p for p in report["large"]}
    bandwidth, int8 = report["bandwidth_gbs"], report["peaks"]["int8"]["gflops"]
    lines = {}
    for label, bytes_per_weight, folded in (("int8 weights, folded", 1, True), ("fp32 weights", 4, False)):
        lines[f"memory roofline, {label}"] = {
            e: 1e6 * roofline.weight_bytes_per_image(structure_of(p), batch, bytes_per_weight, folded)
            / (bandwidth * 1e9) for e, p in points.items()}
    lines["compute roofline, int8 peak"] = {
        e: 1e6 * 2 * roofline.activated_macs(structure_of(p)) / (int8 * 1e9) for e, p in points.items()}
    return lines


def structure_of(point):
    return {**config.defaults(), **{k: point[k] for k in ("EXPERTS", "EMB_SIZE", "HIDDEN_SIZE")}}


def plot_large(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points, batch = report["large"], report["settings"]["large_images"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, (key, size, what) in zip(axes, (("bulk_us", batch, f"one batch of {batch}"), ("b1_us", 1, "batch 1"))):
        for engine in dict.fromkeys(p["engine"] for p in points):
            mine = [p for p in points if p["engine"] == engine]
            ax.plot([p["EXPERTS"] for p in mine], [p[key] for p in mine], marker="o", label=engine)
        for (label, line), style in zip(large_rooflines(report, size).items(), ("--", ":", "-.")):
            ax.plot(list(line), list(line.values()), color="grey", linestyle=style, label=label)
        experts = sorted({p["EXPERTS"] for p in points})
        ax.set(xscale="log", yscale="log", xlabel="EXPERTS (TOP 2)", ylabel="microseconds per image", xticks=experts,
               xticklabels=[str(e) for e in experts], title=what)
        readable_log_axes(ax)
        ax.legend(fontsize="x-small")
    first = points[0]
    fig.suptitle(f"Past the caches: EMB_SIZE {first['EMB_SIZE']}, HIDDEN_SIZE {first['HIDDEN_SIZE']}, random weights "
                 f"({report['machine']})")
    save_figure(fig, path)


def readable_log_axes(ax):
    import matplotlib.ticker
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(which="both", alpha=0.3)


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    images_t, labels_t = load_split("test", args.data_dir, args.test_limit)
    images = np.ascontiguousarray(images_t.numpy())
    sizes = (1, 16, 256) if args.quick else BATCH_SIZES
    experts, hidden = ((4, 8), (32,)) if args.quick else (EXPERTS, HIDDEN_SIZES)
    large, large_experts = (({"EMB_SIZE": 64, "HIDDEN_SIZE": 128}, (8,)) if args.quick else (LARGE, LARGE_EXPERTS))
    large_images = 64 if args.quick else LARGE_IMAGES
    peaks = roofline.measure_peaks(512 if args.quick else 2048)
    bandwidth_mb = 64 if args.quick else 512
    bandwidth = roofline.memory_bandwidth_gbs(bandwidth_mb)
    test_set = (images, labels_t.numpy())
    with tempfile.TemporaryDirectory() as workdir:
        sources = registry.Sources(args.checkpoint, workdir, test_set, args.data_dir, calibration_images=300)
        structure = sources.structure
        entries, not_measured = registry.in_report(registry.BATCH_SWEEP, structure)
        batch = batch_sweep(entries, sources, sizes, args.repeats)
        size = size_sweep(workdir, (images[:SIZE_IMAGES], test_set[1][:SIZE_IMAGES]), experts, hidden, args.repeats)
        large_points = large_sweep(workdir, (images[:large_images], test_set[1][:large_images]), large, large_experts,
                                   args.repeats)
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "peaks": peaks, "bandwidth_gbs": bandwidth, "activated_macs": roofline.activated_macs(structure),
              "batch": batch, "size": size, "large": large_points, "not_measured": not_measured,
              "settings": {"images": len(images), "repeats": args.repeats, "quick": args.quick,
                           "large_images": min(large_images, len(images)), "bandwidth_mb": bandwidth_mb}}
    print(write_report(report, args.out_dir, "sweep", markdown,
                       {"sweep_batch.png": plot_batches, "sweep_size.png": plot_sizes, "sweep_large.png": plot_large}))
    return report


def markdown(report):
    sizes = list(next(iter(report["batch"].values())))
    lines = [f"# Scaling sweep ({report['date']})", "", f"Machine: {report['machine']}. Microseconds per image, "
             f"the median of {report['settings']['repeats']} timings; pictures: sweep_batch.png, sweep_size.png, "
             "sweep_large.png.", "",
             "## The trained model, by batch size", "", "| engine | " + " | ".join(f"b={b}" for b in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    lines += [f"| {name} | " + " | ".join(f"{curve[b]:.2f}" if b in curve else "-" for b in sizes) + " |"
              for name, curve in report["batch"].items()]
    lines += ["", "## As the model grows (TOP 2, random weights)", "",
              "| EXPERTS | HIDDEN_SIZE | engine | batch 1024 | batch 1 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['EXPERTS']} | {p['HIDDEN_SIZE']} | {p['engine']} | {p['bulk_us']:.2f} | {p['b1_us']:.1f} |"
              for p in report["size"]]
    lines += large_markdown(report)
    if report["not_measured"]:
        lines += ["", "Not measured here: " + "; ".join(report["not_measured"]) + "."]
    return "\n".join(lines) + "\n"


def large_markdown(report):
    points, batch = report["large"], report["settings"]["large_images"]
    first = points[0]
    lines = ["", f"## Past the caches (EMB_SIZE {first['EMB_SIZE']}, HIDDEN_SIZE {first['HIDDEN_SIZE']}, TOP 2, "
             "random weights)", "", f"Microseconds per image in one batch of {batch} and at batch 1, beside the "
             f"rooflines (sweep_large.png): compute, the activated path at the int8 peak "
             f"({report['peaks']['int8']['gflops']:,.0f} GOP/s); memory, the weights each image's batch must read "
             f"at the bandwidth this run measured ({report['bandwidth_gbs']:.1f} GB/s, a sum over "
             f"{report['settings']['bandwidth_mb']} MB): the experts a batch chooses (all of them, in a batch of "
             f"{batch}; two at batch 1), in int8 as the fused operator holds them (the head folded into each "
             "expert's second layer) and in fp32 as the graphs hold them.", "",
             "| EXPERTS | engine | precision | routing | batch " + str(batch) + " | batch 1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['EXPERTS']} | {p['engine']} | {p['precision']} | {p['routing']} | {p['bulk_us']:.1f} | "
              f"{p['b1_us']:.1f} |" for p in points]
    by_size = {size: large_rooflines(report, size) for size in (batch, 1)}
    lines += ["", "| EXPERTS | " + " | ".join(f"{label} (b={size})" for size, lines_at in by_size.items()
                                               for label in lines_at) + " |",
              "| --- |" + " --- |" * sum(len(lines_at) for lines_at in by_size.values())]
    for e in sorted({p["EXPERTS"] for p in points}):
        lines.append(f"| {e} | " + " | ".join(f"{line[e]:.3g}" for lines_at in by_size.values() for line in lines_at.values())
                     + " |")
    return lines


if __name__ == "__main__":
    run(main)
