"""Every backend and variant this machine has, side by side on the same test images, each timed in
blocks that alternate with the floor: the activated path of a perfect top-k MoE as a plain MLP
(784 -> EMB -> TOP*HIDDEN -> EMB -> 10, random weights) in ONNX Runtime.

Writes results/benchmark.md, results/benchmark.json and results/benchmark.png. With --device cuda
(a CUDA machine) it measures the GPU rows instead, each in both timing modes, against the same floor
on the CUDA provider (device-resident), into results/benchmark-<gpu>.md/json/png."""
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from data import add_data_args, load_split
from moebench import checkpoint, fused, web
from moebench.cli import ArgumentParser, UserError, positive_int, run
from moebench.measuring import clock, floor, fused_profile, roofline
from moebench.measuring.compare import compare
from moebench.measuring.machine import machine
from moebench.reports import benchmark as benchmark_report
from moebench.reports.files import write as write_report
from moebench.runners import openvino_cpu, registry
from moebench.runners.onnx_runtime import GPU_INSTALL, gpu_name


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timing blocks per row; every figure is the median over them (default 5)")
    parser.add_argument("--latency-runs", type=positive_int, default=400,
                        help="single-image runs per block (default 400)")
    parser.add_argument("--calibration-images", type=positive_int, default=1000)
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: every CPU row (default); cuda: every GPU row, on a CUDA machine")
    parser.add_argument("--web", action="store_true",
                        help="add the ONNX Runtime Web row (WebAssembly in headless Chromium, against the floor "
                             "in the same browser); needs Chromium and 'npm ci --prefix web'")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 timing blocks of 20 single-image runs per row, fewer rows")
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_runs, args.repeats = min(args.latency_runs, 20), min(args.repeats, 2)
    if args.repeats < 5 and not args.quick:  # a reportable run is a median of at least 5
        parser.error("--repeats must be >= 5 for a reportable run (use --quick for a smoke run)")
    return args


def require_gpu():
    import onnxruntime as ort
    if not torch.cuda.is_available() and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: no CUDA device here (PyTorch sees none and onnxruntime has no "
                        "CUDAExecutionProvider); " + GPU_INSTALL)


def identity(entry):
    return {"key": entry.key, "name": entry.label, "group": entry.group, "routing": entry.routing,
            "precision": entry.precision}


def measure_row(entry, sources, floor_clock, args):
    """One row: the entry's runner made now (its setup is not timed), its logits on every test
    image, and its times in blocks that alternate with the floor."""
    images = sources.test_set[0]
    with entry.make(sources) as runner:
        timed = runner.clock(entry.timing)
        logits = clock.full_pass(timed, images, 1024)
        return {**identity(entry), "described": runner.describe(), "logits": logits,
                **floor.time_against_floor(timed, floor_clock, images, args.repeats, args.latency_runs)}


def add_comparisons(rows, reference, labels):
    """Each row's accuracy, and its agreement and largest logit difference with the reference row."""
    expected = next(r["logits"] for r in rows if r["key"] == reference)
    for r in rows:
        found = compare(r.pop("logits"), expected, labels)
        r.update(accuracy=found["accuracy"], agreement=found["agreement"], max_logit_diff=found["max_logit_diff"])


def dataloader_row(entry, sources, floor_clock, args):
    images, labels = sources.test_set
    return {**identity(entry), **floor.through_a_dataloader(sources.onnx("loop"), images, labels, args.repeats,
                                                             floor_clock)}


def measure_rows(args, sources, on_gpu):
    """(rows, what this machine lacks, the reference row's key)."""
    entries, lacking = registry.runnable(sources.structure, "cuda" if on_gpu else "cpu")
    if args.quick:
        entries = [e for e in entries if e.quick or on_gpu]
    if not args.web:
        entries = [e for e in entries if e.measured_by != "browser"]
    if not any(e.measured_by == "runner" for e in entries):
        raise UserError("--device cuda: no GPU row can run here: " + "; ".join(lacking))
    measured_by = {"runner": measure_row, "browser": web_row}
    with floor.floor_runner(sources.structure, sources.workdir, on_gpu) as floor_runner:
        floor_clock = floor_runner.clock(floor.floor_timing(on_gpu))
        rows = [measured_by[entry.measured_by](entry, sources, floor_clock, args)
                for entry in tqdm(entries, unit="row", desc="benchmark", disable=None)
                if entry.measured_by in measured_by]
        reference = rows[0]["key"] if on_gpu else registry.REFERENCE
        add_comparisons(rows, reference, sources.test_set[1])  # the DataLoader row reports accuracy alone
        rows += [dataloader_row(entry, sources, floor_clock, args) for entry in entries
                 if entry.measured_by == "dataloader"]
    return rows, lacking, reference


def web_row(entry, sources, floor_clock, args):
    """The dense graph in onnxruntime-web (wasm) in headless Chromium, alternating with the floor MLP
    in the same browser (floor_clock() wrote it to the work folder)."""
    images = sources.test_set[0]
    files = web.test_set_files(Path(sources.onnx("dense")).read_bytes(), images)
    files["/floor.onnx"] = Path(sources.workdir, "floor.onnx").read_bytes()
    sizes = sorted({min(size, len(images)) for size in (64, 1024, len(images))})
    server = web.PageServer(files)
    try:
        browser = web.Browser()
        try:
            timed, described, logits = web.time_against_floor(browser, server.url, sizes, args.repeats,
                                                              args.latency_runs)
        finally:
            browser.close()
    finally:
        server.close()
    threads = described["threads"]
    return {**identity(entry), "name": f"ONNX Runtime Web, WebAssembly, dense ({threads} thread"
                                      f"{'s' if threads != 1 else ''}, headless Chromium)",
            "described": described, "logits": logits, **timed}


def main(argv=None):
    import onnxruntime as ort
    args = parse_args(argv)
    images, labels = load_split("test", args.data_dir, args.test_limit)
    test_set = (np.ascontiguousarray(images.numpy()), labels.numpy())
    on_gpu = args.device == "cuda"
    if on_gpu:
        require_gpu()
    if args.web:  # before the long run, not after it
        web.require_ort_web()
        web.chromium_paths()
    peaks = None if on_gpu else roofline.measure_peaks(512 if args.quick else 2048)
    profiled = where_the_fused_operator_s_time_goes(args, test_set[0])  # before any other engine is loaded
    with tempfile.TemporaryDirectory() as workdir:
        sources = registry.Sources(args.checkpoint, workdir, test_set, args.data_dir,
                                   calibration_images=args.calibration_images)
        structure = sources.structure
        rows, lacking, reference = measure_rows(args, sources, on_gpu)
    result = {"machine": machine(torch, ort, onnx, np), "structure": structure, "rows": rows,
              "skipped": lacking, "peaks": peaks, "reference_key": reference, "fused_profile": profiled,
              "reference": next(r["name"] for r in rows if r["key"] == reference),
              "settings": {"images": len(test_set[0]), "repeats": args.repeats, "latency_runs": args.latency_runs,
                           "quick": args.quick, "device": args.device,
                           "floor": floor.description(structure, on_gpu)}}
    result["machine"]["versions"]["openvino"] = openvino_cpu.version()
    if on_gpu:
        result["machine"]["gpu"] = gpu_name()
    else:
        for r in rows:
            r["roofline"] = roofline.placement(r["model"]["best_test_set_ms"], len(test_set[0]), structure,
                                               r["routing"], r["precision"], peaks)
    result["recommendation"] = benchmark_report.recommendation(rows, reference)
    stem = "benchmark" + (f"-{gpu_slug()}" if on_gpu else "")
    print(write_report(result, args.out_dir, stem, benchmark_report.markdown,
                       {f"{stem}.png": benchmark_report.plot}))
    return result


def where_the_fused_operator_s_time_goes(args, images):
    """The fused operator's phases and limits on each SIMD path this CPU has, in a CPU run of a model it
    takes. Measured first, in a process no other engine has loaded threads into yet."""
    model, structure, _ = checkpoint.load_model(args.checkpoint)
    if args.device != "cpu" or not fused.takes(structure):
        return None
    return fused_profile.measure(model, structure, images, args.repeats, 200 if args.quick else 2000)


def gpu_slug():
    return "".join(c if c.isalnum() else "-" for c in gpu_name().lower()).strip("-")


if __name__ == "__main__":
    run(main)
