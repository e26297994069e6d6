"""Export and every backend script, end to end on a tiny trained model and a small test subset."""
import json
import os
import re

import onnx
import pytest

import export_onnx
import onnx_cpu_infer
import onnx_fp16_infer
import onnx_quantize_infer
import torch_infer
import train
from moebench import checkpoint, export
from moebench.cli import UserError
from conftest import one_line_error, run_script, run_scripts, without_gpus

SUBSET = "300"


@pytest.fixture(scope="module")
def trained(tiny_copy, mnist_dir):
    """The shared tiny model, exported again here with its picture (the scripts write beside it)."""
    export_onnx.main(["--checkpoint", str(tiny_copy / "checkpoint.pt"), "--output", str(tiny_copy / "model.onnx"),
                      "--data-dir", mnist_dir, "--test-limit", SUBSET, "--dot", str(tiny_copy / "model.dot")])
    return tiny_copy


def backend_args(trained, mnist_dir, model="model.onnx", *extra):
    return ["--model", str(trained / model), "--data-dir", mnist_dir, "--test-limit", SUBSET,
            "--latency-runs", "20", "--batch-size", "128", "--quiet", *extra]


def test_export_is_valid_annotated_and_has_a_dynamic_batch(trained):
    model = onnx.load(str(trained / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["EXPERTS"] == "4" and metadata["TOP"] == "2" and metadata["EMB_SIZE"] == "32"
    assert json.loads(metadata["structure_json"])["HIDDEN_SIZE"] == 32
    assert float(metadata["test_accuracy_onnxruntime"]) == float(metadata["test_accuracy_torch"])
    assert "float32 (N, 1, 28, 28)" in model.doc_string and "[0, 1]" in model.doc_string
    assert [o.name for o in model.graph.output] == ["logits", "gates"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    dot = (trained / "model.dot").read_text()
    assert dot.count('[label="') == len(model.graph.node) and '"TopK"' in dot


def test_export_prints_parity_and_op_counts(trained, mnist_dir, capsys):
    export_onnx.main(["--checkpoint", str(trained / "checkpoint.pt"), "--output", str(trained / "again.onnx"),
                      "--data-dir", mnist_dir, "--test-limit", SUBSET])
    out = capsys.readouterr().out
    assert f"parity on {SUBSET} test images" in out and "argmax agrees on 100.00%" in out
    assert "TopK 1" in out and "Softmax 1" in out


def test_export_refuses_to_write_a_model_that_breaks_parity(trained, mnist_dir, monkeypatch):
    monkeypatch.setattr(export, "MAX_LOGIT_DIFF", -1.0)
    with pytest.raises(UserError, match="parity broken"):
        export_onnx.main(["--checkpoint", str(trained / "checkpoint.pt"), "--output",
                          str(trained / "broken.onnx"), "--data-dir", mnist_dir, "--test-limit", "50"])
    assert not (trained / "broken.onnx").exists()


def torch_accuracy(trained, mnist_dir, images=int(SUBSET)):
    model, _, _ = checkpoint.load_model(str(trained / "checkpoint.pt"))
    images, labels = train.load_split("test", mnist_dir, images)
    return train.evaluate(model, images, labels)[0]


def test_torch_script_reports_eager_and_torchscript(trained, mnist_dir):
    records = torch_infer.main(backend_args(trained, mnist_dir, "checkpoint.pt", "--device", "cpu",
                                             "--variant", "eager", "torchscript"))
    assert [r["backend"].split(" on ")[0] for r in records] == ["PyTorch eager", "PyTorch TorchScript (frozen)"]
    expected = torch_accuracy(trained, mnist_dir)
    assert all(r["accuracy"] == pytest.approx(expected) for r in records)


def test_onnx_cpu_accuracy_equals_torch_and_json_has_every_field(trained, mnist_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    for level, kernels in (("disable", []), ("all", ["--kernels"])):
        record = onnx_cpu_infer.main(backend_args(trained, mnist_dir, "model.onnx", "--json", str(results),
                                               "--opt-level", level, "--threads", "1", *kernels))[0]
        assert record["accuracy"] == pytest.approx(torch_accuracy(trained, mnist_dir))
        # the provider-kernel profile only when asked, and it says where it comes from
        shown = record["details"].get("kernels on", "")
        assert bool(shown) == bool(kernels) and (not kernels or re.match(r"CPUExecutionProvider \d+ \(nodes, from a "
                                                                        r"second, profiled session\)$", shown))
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        for field in ("script", "backend", "model", "setup_s", "accuracy", "images", "batch_size",
                      "test_set_s", "test_set_runs", "images_per_s", "latency_p50_us", "latency_p99_us",
                      "latency_runs", "versions", "cpu", "cores", "time", "details"):
            assert field in line, field
        assert line["images"] == int(SUBSET) and line["batch_size"] == 128
        assert line["latency_p50_us"] <= line["latency_p99_us"]
        assert line["backend"] == "ONNX Runtime CPU" and line["details"]["provider"] == "CPUExecutionProvider"
        assert line["images_per_s"] == pytest.approx(line["images"] / line["test_set_s"])


def test_fp16_runs_where_it_says(trained, mnist_dir):
    import onnxruntime as ort
    record = onnx_fp16_infer.main(backend_args(trained, mnist_dir))[0]
    where = "CUDA" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU"
    assert record["backend"].startswith(f"ONNX Runtime FP16 on {where}")
    assert record["details"]["precision"] == ("fp16" if where == "CUDA" else "fp16 weights, fp32 compute")
    assert abs(record["accuracy"] - torch_accuracy(trained, mnist_dir)) <= 1.0
    model = onnx.load(str(trained / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def test_int8_models_are_smaller_and_within_half_a_point(small_models, mnist_dir):
    """On a model trained well enough to have margins, over 2000 test images."""
    args = ["--model", str(small_models / "model.onnx"), "--data-dir", mnist_dir, "--test-limit", "2000",
            "--latency-runs", "20", "--quiet", "--calibration-images", "500"]
    results = onnx_quantize_infer.main(args)
    assert set(results) == {"dynamic", "static QDQ"}
    fp32_size = os.path.getsize(small_models / "model.onnx")
    expected = torch_accuracy(small_models, mnist_dir, 2000)
    for method, record in results.items():
        assert record["details"]["precision"] == "int8", method
        assert os.path.getsize(record["model"]) < 0.5 * fp32_size, method
        assert abs(record["accuracy"] - expected) <= 0.5, method
    static = onnx.load(results["static QDQ"]["model"])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in static.graph.node}


@pytest.mark.parametrize("script, provider", [("onnx_cuda_infer.py", "CUDAExecutionProvider"),
                                              ("onnx_trt_infer.py", "TensorrtExecutionProvider")])
def test_gpu_scripts_without_their_provider_fail_clearly(trained, mnist_dir, script, provider):
    line = one_line_error(run_script(script, *backend_args(trained, mnist_dir), env=without_gpus()))
    assert provider in line and "requirements-gpu.txt" in line


def test_bad_inputs_fail_with_one_line(trained, mnist_dir, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf")
    cases = [(("onnx_cpu_infer.py", "--model", str(tmp_path / "absent.onnx")),
              "absent.onnx not found; run train.py, then export_onnx.py first"),
             (("onnx_cpu_infer.py", *backend_args(trained, mnist_dir), "--model", str(tmp_path / "junk.onnx")),
              "junk.onnx is not an ONNX model"),
             (("onnx_cpu_infer.py", "--batch-size", "0"), "--batch-size: must be a positive integer, got 0"),
             (("export_onnx.py", "--test-limit", "0"), "--test-limit: must be a positive integer, got 0"),
             (("export_onnx.py", "--checkpoint", str(tmp_path / "none.pt")),
              "none.pt not found; run train.py first (or pass --checkpoint PATH)"),
             (("torch_infer.py", "--model", str(tmp_path / "none.pt")),
              "none.pt not found; run train.py first (or pass --model PATH)"),
             (("torch_infer.py", *backend_args(trained, mnist_dir, "checkpoint.pt"), "--experts", "8"),
              "trained with EXPERTS=4, but the command line asks for 8")]
    for (command, expected), result in zip(cases, run_scripts(*[command for command, _ in cases])):
        assert expected in one_line_error(result), command
