"""How cost grows with the work: (a) per-image cost against batch size for the trained model on the
best rows of each engine; (b) per-image cost as the model grows (EXPERTS and HIDDEN_SIZE, TOP 2,
random weights: only time matters), dense against loop routing against the best engine, beside
the roofline of the activated path. Writes results/sweep.json, sweep_batch.png, sweep_size.png."""
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

import config
import export_onnx
import onnx_quantize_infer
from common import checkpoint, fused, measure, openvino_cpu, roofline, sessions
from common.cli import ArgumentParser, atomic_path, positive_int, run, save_figure
from data import add_data_args, load_split
from moe import build_model

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


# ---------------------------------------------------------------- engines

def onnx_engine(path):
    return sessions.predictor(sessions.create_session(path, ["CPUExecutionProvider"]))


def openvino_engine(path, precision="bf16", int8_calibration=None):
    model = openvino_cpu.read(path)
    if int8_calibration is not None:
        model = openvino_cpu.quantize_int8(model, int8_calibration)[0]
    return openvino_cpu.runner(openvino_cpu.compile_model(model, precision))


def export_both(model, structure, workdir, images, labels, tag):
    """{routing: ONNX path} for one set of weights."""
    paths = {}
    for routing in config.ROUTINGS:
        model.moe.routing = routing
        path = os.path.join(workdir, f"{tag}.{routing}.onnx")
        export_onnx.write_checked(model, {**structure, "ROUTING": routing}, path, "torchscript", images, labels)
        paths[routing] = path
    return paths


# ---------------------------------------------------------------- timing

def per_image_us(predict, images, batch_size, repeats):
    """Median over `repeats` of the wall time per image for a pass at `batch_size`, after a warm-up."""
    images = images[:max(min(len(images), 2048), batch_size)]
    measure.warm_up(predict, images, (min(batch_size, len(images)),))
    times = [measure.time_full_pass(predict, images, batch_size) for _ in range(repeats)]
    return 1e6 * statistics.median(times) / len(images)


def batch_sweep(engines, images, sizes, repeats):
    """{engine: {batch size: us per image}}."""
    curves = {}
    for name, make in tqdm(engines.items(), desc="batch sweep", unit="engine", disable=None):
        predict = make()
        curves[name] = {str(size): per_image_us(predict, images, size, repeats) for size in sizes
                        if size <= len(images)}
    return curves


def random_model(structure, seed=0):
    """Random weights with a random gate (the trained gate starts at zero), so routing spreads."""
    torch.manual_seed(seed)
    model = build_model(structure).eval()
    with torch.no_grad():
        model.moe.w_gate.normal_(0, 1)
    return model


def size_sweep(workdir, images, labels, experts, hidden_sizes, repeats):
    """[{EXPERTS, HIDDEN_SIZE, engine, bulk_us, b1_us, activated_macs, graph_macs}]."""
    points, pixels = [], np.ascontiguousarray(images.numpy())
    configs = [(e, h) for h in hidden_sizes for e in experts]
    for e, h in tqdm(configs, desc="size sweep", unit="model", disable=None):
        structure = {**config.defaults(), "EXPERTS": e, "HIDDEN_SIZE": h}
        paths = export_both(random_model(structure), structure, workdir, images, labels, f"e{e}h{h}")
        engines = {"ONNX Runtime fp32, dense": (lambda: onnx_engine(paths["dense"]), "dense"),
                   "ONNX Runtime fp32, loop": (lambda: onnx_engine(paths["loop"]), "loop"),
                   "OpenVINO bf16, dense": (lambda: openvino_engine(paths["dense"]), "dense"),
                   "OpenVINO bf16, loop": (lambda: openvino_engine(paths["loop"]), "loop")}
        for name, (make, routing) in engines.items():
            predict = make()
            points.append({"EXPERTS": e, "HIDDEN_SIZE": h, "engine": name,
                           "bulk_us": per_image_us(predict, pixels, 1024, repeats),
                           "b1_us": per_image_us(predict, pixels[:200], 1, repeats),
                           "activated_macs": roofline.activated_macs(structure),
                           "graph_macs": roofline.graph_macs(structure, routing)})
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

def trained_engines(args, workdir, images, labels):
    """The best rows of each engine on the trained model (benchmark.py's frontier)."""
    model, structure, _ = checkpoint.load_model(args.checkpoint)
    paths = export_both(model, structure, workdir, images, labels, "trained")
    calibration = load_split("train", args.data_dir, 300)[0].numpy()
    int8 = {routing: onnx_quantize_infer.quantize(paths[routing], os.path.join(workdir, f"int8.{routing}.onnx"),
                                                  "dynamic") for routing in config.ROUTINGS}
    engines = {
        "ONNX Runtime fp32, dense": lambda: onnx_engine(paths["dense"]),
        "ONNX Runtime fp32, loop": lambda: onnx_engine(paths["loop"]),
        "ONNX Runtime INT8 dynamic, dense": lambda: onnx_engine(int8["dense"]),
        "ONNX Runtime INT8 dynamic, loop": lambda: onnx_engine(int8["loop"]),
        "OpenVINO bf16, dense": lambda: openvino_engine(paths["dense"]),
        "OpenVINO bf16, loop": lambda: openvino_engine(paths["loop"]),
        "OpenVINO INT8 (NNCF), loop": lambda: openvino_engine(paths["loop"], "auto", calibration)}
    not_measured = [f"fused INT8 operator, {k} path: {why}" for k, why in fused.unavailable_kernels().items()]
    if fused.takes(structure):
        kernel = fused.chosen_kernel()
        engines[f"PyTorch custom op, fused INT8 ({fused.KERNELS[kernel][2]})"] = \
            lambda: fused.predictor(fused.FusedInt8(model, structure, kernel))
    else:
        not_measured = ["fused INT8 operator: it needs EMB_SIZE and HIDDEN_SIZE multiples of 64 and at most 16 experts"]
    return structure, engines, not_measured


def main(argv=None):
    args = parse_args(argv)
    images_t, labels_t = load_split("test", args.data_dir, args.test_limit)
    images = np.ascontiguousarray(images_t.numpy())
    sizes = (1, 16, 256) if args.quick else BATCH_SIZES
    experts, hidden = ((4, 8), (32,)) if args.quick else (EXPERTS, HIDDEN_SIZES)
    peaks = roofline.measure_peaks(512 if args.quick else 2048)
    with tempfile.TemporaryDirectory() as workdir:
        structure, engines, not_measured = trained_engines(args, workdir, images_t, labels_t)
        batch = batch_sweep(engines, images, sizes, args.repeats)
        size = size_sweep(workdir, images_t[:SIZE_IMAGES], labels_t[:SIZE_IMAGES], experts, hidden, args.repeats)
    report = {"machine": f"{measure.cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "peaks": peaks, "activated_macs": roofline.activated_macs(structure), "batch": batch, "size": size,
              "not_measured": not_measured,
              "settings": {"images": len(images), "repeats": args.repeats, "quick": args.quick}}
    with atomic_path(os.path.join(args.out_dir, "sweep.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    plot_batches(report, os.path.join(args.out_dir, "sweep_batch.png"))
    plot_sizes(report, os.path.join(args.out_dir, "sweep_size.png"))
    print_summary(report)
    return report


def print_summary(report):
    print("per-image cost (us) by batch size:")
    for name, curve in report["batch"].items():
        print(f"  {name:34s} " + "  ".join(f"b={b}: {us:.2f}" for b, us in curve.items()))
    print("per-image cost (us) at batch 1024 as the model grows:")
    for p in report["size"]:
        print(f"  EXPERTS {p['EXPERTS']:3d} HIDDEN {p['HIDDEN_SIZE']:5d} {p['engine']:26s} "
              f"bulk {p['bulk_us']:8.2f}  b=1 {p['b1_us']:8.1f}")
    for line in report["not_measured"]:
        print(f"not measured here: {line}")


if __name__ == "__main__":
    run(main)
