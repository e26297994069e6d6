"""The machine's real limit: measured matrix-multiply peaks per precision, and how many
multiply-adds (MACs) an image costs, both on the activated path a perfect top-k MoE computes and in
what each exported graph really computes. A row's best possible time at a precision is the
activated path, its head folded in, at that precision's peak."""
import numpy as np

from . import clock

PRECISIONS = ("fp32", "bf16", "int8")


def activated_macs(s):
    """Per image: embedding, gate, the TOP chosen experts (two layers each), head."""
    return (s["INPUT_SIZE"] * s["EMB_SIZE"] + s["EMB_SIZE"] * s["EXPERTS"]
            + s["TOP"] * 2 * s["EMB_SIZE"] * s["HIDDEN_SIZE"] + s["EMB_SIZE"] * s["CLASSES"])


def folded_macs(s):
    """Per image, the activated path with the head folded into each chosen expert's second layer
    (exact: nothing nonlinear lies between them): the least a top-k MoE of this structure must
    compute, hence the roofline's work."""
    return (s["INPUT_SIZE"] * s["EMB_SIZE"] + s["EMB_SIZE"] * s["EXPERTS"]
            + s["TOP"] * (s["EMB_SIZE"] * s["HIDDEN_SIZE"] + s["HIDDEN_SIZE"] * s["CLASSES"]))


def graph_macs(s, routing):
    """Per image, what the exported graph of `routing` computes. dense: every expert's first layer
    on every image (with the always-1 bias unit), the gate spread over those units, and the head
    folded into each expert's second layer; loop and the fused operator: only the chosen experts,
    the head folded in (folded_macs)."""
    if routing in ("loop", "fused"):
        return folded_macs(s)
    units = s["EXPERTS"] * (s["HIDDEN_SIZE"] + 1)
    return (s["INPUT_SIZE"] * s["EMB_SIZE"] + s["EMB_SIZE"] * s["EXPERTS"] + s["EXPERTS"] * units
            + s["EMB_SIZE"] * units + units * s["CLASSES"])


def _best_seconds(run, repeats):
    return min(clock.seconds_of(run, repeats))


def _ort_matmul(a_type, b, out_type, op):
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    n = b.shape[0]
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "peak",
                              [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("c", out_type, [n, n])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def measure_peaks(size=2048, repeats=5):
    """{precision: (GFLOP/s, which library reached it)}: the best of size^3 matrix products, two
    FLOPs per multiply-add. fp32: numpy and ONNX Runtime; bf16: torch (oneDNN); int8: ONNX
    Runtime's MatMulInteger (uint8 x int8, VNNI where the CPU has it)."""
    import torch
    from onnx import TensorProto
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    flops = 2.0 * size ** 3
    fp32_ort = _ort_matmul(TensorProto.FLOAT, b, TensorProto.FLOAT, "MatMul")
    int8_ort = _ort_matmul(TensorProto.UINT8, rng.integers(-128, 127, (size, size), dtype=np.int8),
                           TensorProto.INT32, "MatMulInteger")
    a_u8 = rng.integers(0, 255, (size, size), dtype=np.uint8)
    a_bf16, b_bf16 = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    candidates = {"fp32": {"numpy": lambda: a @ b, "onnxruntime": lambda: fp32_ort.run(None, {"a": a})},
                  "bf16": {"torch": lambda: a_bf16 @ b_bf16},
                  "int8": {"onnxruntime MatMulInteger": lambda: int8_ort.run(None, {"a": a_u8})}}
    peaks = {}
    for precision, runs in candidates.items():
        rates = {name: flops / _best_seconds(run, repeats) / 1e9 for name, run in runs.items()}
        best = max(rates, key=rates.get)
        peaks[precision] = {"gflops": rates[best], "by": best, "size": size}
    return peaks


def best_possible_ms(macs_per_image, images, gflops):
    return 2.0 * macs_per_image * images / (gflops * 1e9) * 1e3


def placement(best_ms, images, s, routing, precision, peaks):
    """Where a row stands: the share of its precision's peak the graph's own MACs reach, and its
    time against the best possible time (the folded activated path at that precision's peak)."""
    peak = peaks[precision]["gflops"]
    achieved = 2.0 * graph_macs(s, routing) * images / (best_ms * 1e-3) / 1e9
    roofline_ms = best_possible_ms(folded_macs(s), images, peak)
    return {"precision": precision, "graph_macs": graph_macs(s, routing), "folded_macs": folded_macs(s),
            "gflops": achieved, "peak_fraction": achieved / peak, "roofline_ms": roofline_ms,
            "vs_roofline": best_ms / roofline_ms}


# ---------------------------------------------------------------- memory: the weights a batch must read

def expert_parameters(s, folded):
    """One expert's weights: its two layers, the second folded with the head (HIDDEN_SIZE x CLASSES, what
    the fused operator holds) or as the graphs hold it (HIDDEN_SIZE x EMB_SIZE)."""
    return s["EMB_SIZE"] * s["HIDDEN_SIZE"] + s["HIDDEN_SIZE"] * (s["CLASSES"] if folded else s["EMB_SIZE"])


def experts_touched(s, batch):
    """How many experts a batch of `batch` images chooses, on average, when each image takes TOP of
    EXPERTS uniformly (a trained gate balances its load toward that)."""
    e, k = s["EXPERTS"], s["TOP"]
    return e * (1 - (1 - k / e) ** batch)


def weight_bytes_per_image(s, batch, bytes_per_weight, folded):
    """The bytes of weights (the embedding, the gate, the experts the batch touches) one image of a batch
    must read from memory, at `bytes_per_weight`: what a model larger than the caches costs at least."""
    shared = s["INPUT_SIZE"] * s["EMB_SIZE"] + s["EMB_SIZE"] * s["EXPERTS"]
    return bytes_per_weight * (shared + experts_touched(s, batch) * expert_parameters(s, folded)) / batch


def memory_bandwidth_gbs(megabytes=512, repeats=5):
    """Reading a float32 array far larger than any cache once (a sum on PyTorch's threads), best of
    `repeats`: the memory bandwidth this run has."""
    import torch
    array = torch.ones(megabytes * 2 ** 20 // 4)
    return megabytes * 2 ** 20 / min(clock.seconds_of(array.sum, repeats)) / 1e9
