"""The two routings compute the same function; the dense graph is static; benchmark.py runs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import train
from moebench import checkpoint, export
from moebench.measuring import floor
from moebench.runners import onnx_runtime, registry
from conftest import ROOT
from moe import build_model


@pytest.fixture(scope="module")
def trained(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def test_images(mnist_dir):
    return train.load_split("test", mnist_dir, limit=2000)


def both_routings(path):
    return {routing: checkpoint.load_model(str(path), {"ROUTING": routing})[0] for routing in ("loop", "dense")}


def test_routings_agree_eager_and_scripted(trained, test_images):
    images, labels = test_images
    models = both_routings(trained / "checkpoint.pt")
    outputs = {}
    with torch.no_grad():
        for routing, model in models.items():
            eager, scripted = model(images), torch.jit.script(model)(images)
            torch.testing.assert_close(scripted[0], eager[0], rtol=1e-5, atol=1e-5)
            outputs[routing] = eager
    torch.testing.assert_close(outputs["dense"][0], outputs["loop"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["dense"][1], outputs["loop"][1])  # the same experts, the same weights
    assert torch.equal(outputs["dense"][0].argmax(1), outputs["loop"][0].argmax(1))


def test_routings_agree_in_training_mode_and_share_state_dicts(tiny_structure):
    torch.manual_seed(0)
    loop = build_model({**tiny_structure, "ROUTING": "loop"}).train()
    dense = build_model({**tiny_structure, "ROUTING": "dense"})
    dense.load_state_dict(loop.state_dict())
    dense.train()
    with torch.no_grad():
        loop.moe.w_gate.normal_()
        dense.moe.w_gate.copy_(loop.moe.w_gate)
    images = torch.rand(64, 1, 28, 28)
    torch.manual_seed(1)
    a = loop.forward_with_loss(images)
    torch.manual_seed(1)
    b = dense.forward_with_loss(images)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_graphs_agree_and_dense_is_static(trained, test_images, exporter, tmp_path):
    images, labels = test_images
    outputs = {}
    for routing, model in both_routings(trained / "checkpoint.pt").items():
        path = str(tmp_path / f"{routing}.onnx")
        graph = export.write_checked(model, checkpoint.load(str(trained / "checkpoint.pt"))["structure"],
                                     path, exporter, images, labels).graph
        ops = {node.op_type for node in graph.node}
        if routing == "dense":
            assert not ops & {"NonZero", "Loop", "If", "Scan", "Where"}, ops
            top_k = next(node for node in graph.node if node.op_type == "TopK")
            initializers = {init.name: init for init in graph.initializer}
            assert top_k.input[1] in initializers  # K is a constant TensorRT can read
            assert onnx.numpy_helper.to_array(initializers[top_k.input[1]]).tolist() == [2]
        else:
            assert "NonZero" in ops
        session = onnx_runtime.create_session(path, ["CPUExecutionProvider"])
        outputs[routing] = session.run(None, {"pixels": images.numpy()})
    np.testing.assert_allclose(outputs["dense"][0], outputs["loop"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outputs["dense"][1], outputs["loop"][1])


def test_structure_is_in_the_metadata_and_rebuilds_the_floor(trained, test_images, tmp_path):
    images, labels = test_images
    model, structure, _ = checkpoint.load_model(str(trained / "checkpoint.pt"), {"ROUTING": "dense"})
    path = str(tmp_path / "model.onnx")
    metadata = {p.key: p.value for p in export.write_checked(
        model, structure, path, "torchscript", images, labels).metadata_props}
    for name in ("EXPERTS", "TOP", "EMB_SIZE", "HIDDEN_SIZE", "ROUTING"):
        assert metadata[name] == str(structure[name])
    mlp = onnx.load(floor.build_floor(onnx_runtime.stored_structure(path), str(tmp_path / "floor.onnx")))
    shapes = [tuple(init.dims) for init in mlp.graph.initializer if init.name.startswith("w")]
    assert shapes == [(784, 32), (32, 2 * 32), (2 * 32, 32), (32, 10)]
    assert {node.op_type for node in mlp.graph.node} == {"Flatten", "MatMul", "Add", "Relu", "Identity"}


def check_targets(path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "check_targets.py"), str(path)],
                          capture_output=True, text=True)


def test_the_smoke_run_s_benchmark_has_every_file_and_field(smoke_results, tmp_path):
    """benchmark.py --quick as run_all.sh --quick ran it, on 1000 test images."""
    out = smoke_results
    saved = json.loads((out / "benchmark.json").read_text())
    names = [row["name"] for row in saved["rows"]]
    keys = [row["key"] for row in saved["rows"]]
    for expected in (registry.REFERENCE, "ort-loop", "ort-loop-dataloader", "torch-eager-dense", "torch-script-dense",
                     "ort-dense-dynamo", "ort-fp16-dense", "ort-int8-static"):
        assert expected in keys
    assert len(set(keys)) == len(keys)
    # labels only display; the browser's row names the threads the page got
    assert all(registry.entry(row["key"]).label == row["name"] for row in saved["rows"]
               if registry.entry(row["key"]).measured_by != "browser")
    for row in saved["rows"]:
        assert 0 <= row["accuracy"] <= 100 and row["vs_floor_test_set"] > 0
        assert row["model"]["images_per_s"] > 0 and row["floor"]["best_test_set_ms"] > 0
        if row["key"] != "ort-loop-dataloader":
            assert set(row["model"]["latency_us"]) == {"p50", "p90", "p99"}
            # the page in the browser times no batch larger than the test set
            browser = registry.entry(row["key"]).measured_by == "browser"
            assert set(row["model"]["test_set_ms"]) == ({"64", "1000"} if browser else {"64", "1024", "1000"})
            assert row["vs_floor_b1"] > 0 and 0 <= row["agreement"] <= 100
            assert {"engine", "provider", "precision", "threads"} <= set(row["described"])
    reference = next(row for row in saved["rows"] if row["key"] == registry.REFERENCE)
    assert reference["agreement"] == 100.0 and reference["max_logit_diff"] == 0.0
    assert reference["described"]["provider"] == "CPUExecutionProvider"
    assert saved["machine"]["cores"] and saved["machine"]["versions"]["onnxruntime"]
    markdown = (out / "benchmark.md").read_text()
    assert all(name in markdown for name in names)
    assert not re.search(r"seed|target|fast path|issue", markdown, re.IGNORECASE)  # measurements only
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    goals = check_targets(out / "benchmark.json")
    lines = goals.stdout.splitlines()
    met, total = map(int, re.fullmatch(r"(\d+) of (\d+) goals met", lines[-1]).groups())
    assert goals.stderr == "" and total == len(lines) - 1 and met == sum(line.startswith("met ") for line in lines)
    assert goals.returncode == (0 if met == total else 1)
    # each goal is judged from the report's numbers: the dense graph at 100x the floor misses its goal
    dense = next(row for row in saved["rows"] if row["key"] == registry.REFERENCE)
    dense["vs_floor_b1"] = 100.0
    (tmp_path / "worse.json").write_text(json.dumps(saved))
    worse = check_targets(tmp_path / "worse.json")
    assert "MISSED ONNX Runtime CPU dense graph, batch-1 p50 vs floor: 100.00 (<= 2.0)" in worse.stdout
    was_met = any(line.startswith("met    ONNX Runtime CPU dense graph, batch-1 p50 vs floor") for line in lines)
    assert worse.returncode == 1 and worse.stdout.splitlines()[-1] == f"{met - was_met} of {total} goals met"
