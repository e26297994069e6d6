"""How cost grows with the work: (a) per-image cost against batch size for the trained model on the
best rows of each engine; (b) per-image cost as the model grows (EXPERTS and HIDDEN_SIZE, TOP 2,
random weights: only time matters), dense against loop routing against the best engine, beside
the roofline of the activated path. Writes results/sweep.md, sweep.json, sweep_batch.png, sweep_size.png."""
import os
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
    peaks = roofline.measure_peaks(512 if args.quick else 2048)
    test_set = (images, labels_t.numpy())
    with tempfile.TemporaryDirectory() as workdir:
        sources = registry.Sources(args.checkpoint, workdir, test_set, args.data_dir, calibration_images=300)
        structure = sources.structure
        entries, not_measured = registry.in_report(registry.BATCH_SWEEP, structure)
        batch = batch_sweep(entries, sources, sizes, args.repeats)
        size = size_sweep(workdir, (images[:SIZE_IMAGES], test_set[1][:SIZE_IMAGES]), experts, hidden, args.repeats)
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "peaks": peaks, "activated_macs": roofline.activated_macs(structure), "batch": batch, "size": size,
              "not_measured": not_measured,
              "settings": {"images": len(images), "repeats": args.repeats, "quick": args.quick}}
    print(write_report(report, args.out_dir, "sweep", markdown,
                       {"sweep_batch.png": plot_batches, "sweep_size.png": plot_sizes}))
    return report


def markdown(report):
    sizes = list(next(iter(report["batch"].values())))
    lines = [f"# Scaling sweep ({report['date']})", "", f"Machine: {report['machine']}. Microseconds per image, "
             f"the median of {report['settings']['repeats']} timings; pictures: sweep_batch.png, sweep_size.png.", "",
             "## The trained model, by batch size", "", "| engine | " + " | ".join(f"b={b}" for b in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    lines += [f"| {name} | " + " | ".join(f"{curve[b]:.2f}" if b in curve else "-" for b in sizes) + " |"
              for name, curve in report["batch"].items()]
    lines += ["", "## As the model grows (TOP 2, random weights)", "",
              "| EXPERTS | HIDDEN_SIZE | engine | batch 1024 | batch 1 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['EXPERTS']} | {p['HIDDEN_SIZE']} | {p['engine']} | {p['bulk_us']:.2f} | {p['b1_us']:.1f} |"
              for p in report["size"]]
    if report["not_measured"]:
        lines += ["", "Not measured here: " + "; ".join(report["not_measured"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(main)
