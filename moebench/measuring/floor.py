"""The floor every benchmark row is held against, and how rows are timed against it: the activated
path of a perfect top-k MoE as a plain MLP (784 -> EMB -> TOP*HIDDEN -> EMB -> 10, random weights)
in ONNX Runtime, timed in blocks that alternate with the row so that machine noise hits both alike."""
import os
import statistics
import time

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..runners import onnx_runtime
from . import clock
from .compare import accuracy

SETTLE_S = 0.05  # ONNX Runtime's and OpenMP's idle threads spin for a while after a run
DATALOADER_BATCH = 64


def build_floor(structure, path):
    """784 -> EMB -> TOP*HIDDEN -> EMB -> 10 with MatMul, Add, Relu: what the chosen experts cost
    with no routing at all. Random weights: only its time matters."""
    rng = np.random.default_rng(0)
    sizes = [structure["INPUT_SIZE"], structure["EMB_SIZE"], structure["TOP"] * structure["HIDDEN_SIZE"],
             structure["EMB_SIZE"], structure["CLASSES"]]
    nodes = [helper.make_node("Flatten", ["pixels"], ["h0"])]
    weights = []
    for i, (rows, cols) in enumerate(zip(sizes[:-1], sizes[1:])):
        weights += [numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(np.zeros(cols, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Relu" if i < 2 else "Identity", [f"a{i}"], ["logits" if last else f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes, "floor", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", structure["CLASSES"]])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def floor_runner(structure, workdir, on_gpu=False):
    """The floor MLP for `structure` in ONNX Runtime, on the CPU or on CUDA; floor_timing() says which
    of its clocks the benchmark times it with."""
    path = build_floor(structure, os.path.join(workdir, "floor.onnx"))
    return onnx_runtime.runner(path, "floor MLP", "cuda" if on_gpu else "cpu")


def floor_timing(on_gpu=False):
    """From host arrays on the CPU; device-resident on CUDA."""
    return "resident" if on_gpu else "host"


def description(structure, on_gpu=False):
    return " -> ".join(str(s) for s in (784, structure["EMB_SIZE"], f"{structure['TOP']}x{structure['HIDDEN_SIZE']}",
                                       structure["EMB_SIZE"], 10)) + " MatMul/Add/Relu" + (
        " on the CUDA provider, device-resident" if on_gpu else "")


def percentiles(seconds):
    return {f"p{q}": 1e6 * float(np.percentile(seconds, q)) for q in (50, 90, 99)}


def time_against_floor(predict, floor, images, repeats, latency_runs):
    """Blocks alternate model and floor so that machine noise hits both alike."""
    sizes = (64, 1024, len(images))
    clock.warm_up(predict, images, (1,) + sizes)
    latency = {"model": [], "floor": []}
    full = {"model": {s: [] for s in sizes}, "floor": {s: [] for s in sizes}}
    for block in range(repeats):
        for who, fn in (("model", predict), ("floor", floor)):
            time.sleep(SETTLE_S)  # the other engine's worker threads stop spinning before this one is timed
            latency[who] += clock.time_single_images(fn, images, latency_runs, block * latency_runs)
            for size in sizes:
                full[who][size].append(clock.time_full_pass(fn, images, size))
    return against_floor(latency, full, len(images))


def against_floor(latency, full, images):
    """A row's model and floor figures and their ratios, from {who: [single-image seconds]} and
    {who: {batch size: [full-set seconds]}} for who in model, floor."""
    result = {}
    for who in ("model", "floor"):
        medians = {int(size): statistics.median(times) for size, times in full[who].items()}
        best = min(medians, key=medians.get)
        result[who] = {"latency_us": percentiles(latency[who]),
                       "test_set_ms": {str(s): 1e3 * t for s, t in medians.items()},
                       "best_batch": best, "best_test_set_ms": 1e3 * medians[best],
                       "images_per_s": images / medians[best]}
    result["vs_floor_b1"] = result["model"]["latency_us"]["p50"] / result["floor"]["latency_us"]["p50"]
    result["vs_floor_test_set"] = result["model"]["best_test_set_ms"] / result["floor"]["best_test_set_ms"]
    return result


def through_a_dataloader(path, images, labels, repeats, floor):
    """How many tutorials feed a model: a Dataset that makes a PIL image per item and converts it
    to a tensor as torchvision's ToTensor does, a DataLoader at batch 64, session.run per batch;
    end to end, alternating with the floor."""
    session = onnx_runtime.create_session(path, ["CPUExecutionProvider"])
    pixels_uint8 = np.round(images[:, 0] * 255).astype(np.uint8)
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class PerImage(Dataset):
        def __len__(self):
            return len(pixels_uint8)

        def __getitem__(self, i):
            image = Image.fromarray(pixels_uint8[i], mode="L")
            tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(28, 28, 1)
            return tensor.permute(2, 0, 1).contiguous().to(torch.float32).div(255), int(labels[i])

    def one_pass():
        return [session.run(["logits"], {"pixels": batch.numpy()})[0]
                for batch, _ in DataLoader(PerImage(), batch_size=DATALOADER_BATCH, shuffle=False)]

    times, floor_times, logits = [], [], np.concatenate(one_pass())
    for _ in range(repeats):
        started = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - started)
        floor_times.append(clock.time_full_pass(floor, images, 1024))
    seconds, floor_s = statistics.median(times), statistics.median(floor_times)
    return {"accuracy": accuracy(logits, labels), "model": {
        "test_set_ms": {str(DATALOADER_BATCH): 1e3 * seconds}, "best_batch": DATALOADER_BATCH,
        "best_test_set_ms": 1e3 * seconds, "images_per_s": len(labels) / seconds},
        "floor": {"best_test_set_ms": 1e3 * floor_s}, "vs_floor_test_set": seconds / floor_s}
