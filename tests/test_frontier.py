"""The CPU frontier: OpenVINO agrees with ONNX Runtime, its INT8 keeps accuracy, torch.compile runs,
the roofline counts are right, the sweep runs, and models that break the contract fail cleanly."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import config
import openvino_infer
import sweep
import torch_infer
from moebench import contract, convert, export
from moebench.cli import UserError
from moebench.measuring import clock, roofline
from moebench.measuring.compare import accuracy, compare
from moebench.runners import onnx_runtime, openvino_cpu, registry
from data import load_split
from moebench.test_set import load_test_set
from conftest import one_line_error, run_script

IMAGES = 2000


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return load_test_set(mnist_dir, IMAGES)


@pytest.mark.parametrize("graph", ["model.onnx", "model.loop.onnx"])
def test_openvino_fp32_agrees_with_onnxruntime_on_every_image(tiny_models, test_set, graph):
    images, _ = test_set
    path = str(tiny_models / graph)
    ort_logits = clock.full_pass(onnx_runtime.runner(path).logits, images, 500)
    compiled = openvino_cpu.compile_model(openvino_cpu.read(path), "f32")
    assert openvino_cpu.precision_used(compiled) == "f32"
    ov_logits = clock.full_pass(openvino_cpu.clock(compiled), images, 500)
    np.testing.assert_array_equal(ov_logits.argmax(1), ort_logits.argmax(1))
    np.testing.assert_allclose(ov_logits, ort_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("graph", ["model.onnx", "model.loop.onnx"])
def test_openvino_int8_keeps_the_gate_in_float_and_accuracy_within_0_3_points(
        tiny_models, test_set, mnist_dir, graph):
    images, labels = test_set
    path = str(tiny_models / graph)
    fp32 = accuracy(clock.full_pass(openvino_cpu.clock(openvino_cpu.compile_model(openvino_cpu.read(path), "f32")),
                                    images, 1000), labels)
    calibration = load_split("train", mnist_dir, 300)[0].numpy()
    model, quantized = openvino_cpu.quantize_int8(openvino_cpu.read(path), calibration)
    kept_float = openvino_cpu.gate_path(openvino_cpu.read(path))
    assert quantized and not set(quantized) & kept_float
    fake_quantized = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert fake_quantized, "NNCF inserted no quantizers"
    int8 = accuracy(clock.full_pass(openvino_cpu.clock(openvino_cpu.compile_model(model, "f32")), images, 1000), labels)
    assert abs(int8 - fp32) <= 0.3


@pytest.mark.parametrize("path", ["onnxruntime int8 dynamic, dense", "onnxruntime int8 dynamic, loop",
                                  "openvino int8, dense", "openvino int8, loop", "onnxruntime auto"])
def test_every_faster_path_keeps_the_fp32_answers(small_models, mnist_dir, path):
    """Accuracy within 0.3 points of the fp32 model, and argmax agreement >= 99.9% image by image;
    ONNX Runtime's dynamic INT8 quantizes each batch's activations with one scale for the whole
    batch, so an image's answer depends on its batch: it is held to 99.5% (benchmark.py reports
    each row's agreement on the trained model). All 10k test images: the criterion is a rate, and on
    a 2000-image slice three near-tied images (logit margins under 0.06) decide it."""
    images, labels = load_test_set(mnist_dir, 10000)
    graph = str(small_models / ("model.loop.onnx" if "loop" in path else "model.onnx"))
    fp32 = clock.full_pass(onnx_runtime.runner(graph).logits, images, 500)
    if path.startswith("onnxruntime int8"):
        target = str(small_models / f"{path[-5:].strip(', ')}.int8.onnx")
        quantized = convert.quantize(graph, target, "dynamic")
        predict = onnx_runtime.runner(quantized).logits
    elif path.startswith("openvino"):
        calibration = load_split("train", mnist_dir, 300)[0].numpy()
        predict = openvino_cpu.clock(openvino_cpu.compile_model(
            openvino_cpu.quantize_int8(openvino_cpu.read(graph), calibration)[0], "f32"))
    else:
        predict = onnx_runtime.auto_runner(str(small_models / "model.onnx"), str(small_models / "model.loop.onnx"),
                                           config.AUTO_LOOP_FROM).clock()
    found = compare(clock.full_pass(predict, images, 500), fp32, labels)
    assert found["agreement"] >= (99.5 if "dynamic" in path else 99.9), found
    assert abs(found["accuracy"] - found["reference_accuracy"]) <= 0.3, found


def test_openvino_script_says_which_precision_ran_and_the_int8_change(tiny_models, mnist_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    common = ["--model", str(tiny_models / "model.onnx"), "--data-dir", mnist_dir, "--test-limit", "300",
              "--latency-runs", "20", "--quiet", "--json", str(results)]
    plain, = openvino_infer.main(common + ["--precision", "f32", "--hint", "throughput"])
    assert plain["details"]["precision"].startswith("f32 (asked: f32")
    assert plain["details"]["hint"] == "throughput" and "AsyncInferQueue" in plain["timing"]
    int8, = openvino_infer.main(common + ["--int8", "--calibration-images", "100"])
    assert "NNCF INT8" in int8["details"]["quantized"] and "change" in int8["details"]["vs fp32"]
    assert int8["backend"].startswith("OpenVINO CPU INT8")
    assert len(results.read_text().splitlines()) == 2


def test_torch_compile_variant_reports_its_compile_time_apart(tiny_models, mnist_dir):
    records = torch_infer.main(["--model", str(tiny_models / "checkpoint.pt"), "--data-dir", mnist_dir,
                                "--test-limit", "300", "--latency-runs", "20", "--quiet", "--device", "cpu",
                                "--variant", "compile"])
    eager = torch_infer.main(["--model", str(tiny_models / "checkpoint.pt"), "--data-dir", mnist_dir,
                              "--test-limit", "300", "--latency-runs", "20", "--quiet", "--device", "cpu",
                              "--variant", "eager"])
    assert records[0]["backend"].startswith("PyTorch torch.compile (inductor) on CPU")
    assert "compilation" in records[0]["details"]["setup holds"]
    assert records[0]["accuracy"] == pytest.approx(eager[0]["accuracy"])


def test_roofline_counts_match_a_hand_count_and_the_dense_graph(tmp_path, mnist_dir):
    default = config.defaults()
    hand = 784 * 128 + 128 * 8 + 2 * (128 * 256 + 256 * 128) + 128 * 10
    assert roofline.activated_macs(default) == hand == 233_728
    folded = 784 * 128 + 128 * 8 + 2 * (128 * 256 + 256 * 10)  # the head folded into each expert
    assert roofline.folded_macs(default) == roofline.graph_macs(default, "loop") == folded == 172_032
    model = sweep.random_model({**default, "ROUTING": "dense"})  # a random gate: no top-k ties
    images, labels = load_split("test", mnist_dir, 100)
    graph = export.write_checked(model, default, str(tmp_path / "dense.onnx"), "torchscript", images, labels).graph
    weights = {init.name: init.dims for init in graph.initializer}
    counted = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            dims = weights[node.input[1]]
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            counted += dims[0] * dims[1] if not transposed else dims[1] * dims[0]
    assert roofline.graph_macs(default, "dense") == counted == 401_552


def test_the_weights_a_batch_must_read():
    s = {**config.defaults(), "EXPERTS": 8, "TOP": 2, "EMB_SIZE": 128, "HIDDEN_SIZE": 256}
    assert roofline.experts_touched(s, 1) == pytest.approx(2)  # one image: its TOP experts
    assert roofline.experts_touched(s, 10_000) == pytest.approx(8)  # a large batch: every expert
    assert roofline.expert_parameters(s, folded=False) == 2 * 128 * 256
    assert roofline.expert_parameters(s, folded=True) == 128 * 256 + 256 * 10
    shared = 784 * 128 + 128 * 8
    assert roofline.weight_bytes_per_image(s, 1, 4, folded=False) == pytest.approx(4 * (shared + 2 * 2 * 128 * 256))


def test_placement_arithmetic():
    s = config.defaults()
    peaks = {"fp32": {"gflops": 200.0}}
    place = roofline.placement(best_ms=34.4064, images=10_000, s=s, routing="loop", precision="fp32", peaks=peaks)
    assert place["roofline_ms"] == pytest.approx(2 * 172_032 * 10_000 / 200e9 * 1e3)  # 17.20 ms
    assert place["vs_roofline"] == pytest.approx(2.0)
    assert place["peak_fraction"] == pytest.approx(0.5)


def test_the_smoke_run_s_sweep_has_the_registry_s_rows_and_both_plots(smoke_results):
    """sweep.py --quick as run_all.sh --quick ran it: the batch panel's curves are the registry's
    BATCH_SWEEP entries (one OpenVINO float precision, one fused path), the size panel its SIZE_SWEEP
    ones."""
    saved = json.loads((smoke_results / "sweep.json").read_text())
    trained = config.defaults()  # run_all.sh --quick trains the default structure
    assert list(saved["batch"]) == [e.label for e in registry.in_report(registry.BATCH_SWEEP, trained)[0]]
    assert registry.entry(f"openvino-{registry.openvino_precision()}-loop").label in saved["batch"]
    assert all(set(curve) == {"1", "16", "256"} and min(curve.values()) > 0 for curve in saved["batch"].values())
    assert {(p["EXPERTS"], p["HIDDEN_SIZE"]) for p in saved["size"]} == {(4, 32), (8, 32)}
    assert {p["engine"] for p in saved["size"]} == {e.label for e in registry.in_report(registry.SIZE_SWEEP, trained)[0]}
    assert {p["EXPERTS"] for p in saved["large"]} == {8} and saved["bandwidth_gbs"] > 0
    large = {**trained, "EMB_SIZE": 64, "HIDDEN_SIZE": 128}  # the smoke run's stand-in for a model past the caches
    assert {p["engine"] for p in saved["large"]} == {e.label for e in registry.in_report(registry.LARGE_SWEEP, large)[0]}
    for name in ("sweep_batch.png", "sweep_size.png", "sweep_large.png"):
        assert (smoke_results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (smoke_results / "sweep.md").read_text()
    assert all(f"| {name} |" in markdown for name in saved["batch"])


# ---------------------------------------------------------------- models that break the contract

def foreign_model(path, inputs, outputs):
    """A one-node ONNX model with the given (name, elem type, shape) inputs and outputs."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0][0]], [outputs[0][0]])], "foreign",
        [helper.make_tensor_value_info(*i) for i in inputs], [helper.make_tensor_value_info(*o) for o in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


FOREIGN = {
    "other input name and shape": ([("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                                   [("logits", TensorProto.FLOAT, ["N", 3, 224, 224])], "input 'input' float32"),
    "float64 pixels": ([("pixels", TensorProto.DOUBLE, ["N", 1, 28, 28])],
                       [("logits", TensorProto.DOUBLE, ["N", 1, 28, 28])], "input 'pixels' float64 (N, 1, 28, 28)"),
    "flat pixels": ([("pixels", TensorProto.FLOAT, ["N", 784])], [("logits", TensorProto.FLOAT, ["N", 784])],
                    "input 'pixels' float32 (N, 784)"),
    "fixed batch": ([("pixels", TensorProto.FLOAT, [1, 1, 28, 28])], [("logits", TensorProto.FLOAT, [1, 1, 28, 28])],
                    "input 'pixels' float32 (1, 1, 28, 28)"),
    "no logits output": ([("pixels", TensorProto.FLOAT, ["N", 1, 28, 28])],
                         [("scores", TensorProto.FLOAT, ["N", 1, 28, 28])], "output 'scores' float32"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_contract_names_what_it_expected_and_found(tmp_path, case):
    inputs, outputs, found = FOREIGN[case]
    path = foreign_model(tmp_path / "foreign.onnx", inputs, outputs)
    with pytest.raises(UserError) as error:
        contract.check_onnx(path)
    message = str(error.value)
    assert "expected input 'pixels' float32 (N, 1, 28, 28)" in message and found in message, message


@pytest.mark.parametrize("script", ["onnx_cpu_infer.py", "openvino_infer.py", "onnx_fp16_infer.py",
                                    "onnx_quantize_infer.py"])
def test_every_onnx_script_refuses_a_foreign_model_in_one_line(tmp_path, mnist_dir, script):
    inputs, outputs, found = FOREIGN["other input name and shape"]
    path = foreign_model(tmp_path / "foreign.onnx", inputs, outputs)
    line = one_line_error(run_script(script, "--model", path, "--data-dir", mnist_dir, "--test-limit", "50",
                                     "--latency-runs", "5", "--quiet"))
    assert "breaks the model contract" in line and found in line, line


def test_checkpoint_scripts_refuse_foreign_checkpoints(tiny_models, tmp_path, mnist_dir):
    line = one_line_error(run_script("torch_infer.py", "--model", str(tiny_models / "model.pt"), "--test-limit", "5"))
    assert "is a TorchScript model, not a checkpoint" in line
    state = torch.load(str(tiny_models / "checkpoint.pt"), weights_only=True)
    state["structure"] = {**state["structure"], "INPUT_SIZE": 3072}
    torch.save(state, str(tmp_path / "cifar.pt"))
    for script, flag in (("export_onnx.py", "--checkpoint"), ("torch_infer.py", "--model")):
        line = one_line_error(run_script(script, flag, str(tmp_path / "cifar.pt"), "--data-dir", mnist_dir))
        assert "breaks the model contract: expected INPUT_SIZE=784" in line and "INPUT_SIZE=3072" in line, line
    torch.save({"weights": torch.zeros(3)}, str(tmp_path / "plain.pt"))
    line = one_line_error(run_script("export_onnx.py", "--checkpoint", str(tmp_path / "plain.pt")))
    assert "not a checkpoint written by train.py" in line
