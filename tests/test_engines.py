"""The compilers and mobile runtimes (TVM, IREE, MNN, ncnn, LiteRT, ExecuTorch) on the tiny model: ONNX
Runtime's answers, their scripts' blocks, caches kept out of the user's folder and built again when
corrupt, and bad input in one line."""
import json
import os

import numpy as np
import pytest

import executorch_infer
import iree_infer
import litert_infer
import mnn_infer
import ncnn_infer
import tvm_infer
from conftest import one_line_error, run_scripts
from data import load_split
from moebench import checkpoint
from moebench.runners import (executorch_runtime, iree_runtime, litert_runtime, mnn_runtime, ncnn_runtime,
                              onnx_runtime, tvm_compiler)
from moebench.test_set import load_test_set

IMAGES = 300


def dense_model(folder):
    return checkpoint.load_model(str(folder / "checkpoint.pt"), {"ROUTING": "dense"})[0]


ENGINES = {"iree auto": (lambda f, cache: iree_runtime.runner(str(f / "model.onnx"), cache), "model.onnx"),
           "iree local-task": (lambda f, cache: iree_runtime.runner(str(f / "model.onnx"), cache, "local-task"),
                               "model.onnx"),
           "mnn dense": (lambda f, cache: mnn_runtime.runner(str(f / "model.onnx"), cache), "model.onnx"),
           "mnn loop, 2 threads": (lambda f, cache: mnn_runtime.runner(str(f / "model.loop.onnx"), cache, threads=2),
                                   "model.loop.onnx"),
           "tvm untuned": (lambda f, cache: tvm_compiler.runner(str(f / "model.onnx"), cache), "model.onnx"),
           "tvm untuned, loop": (lambda f, cache: tvm_compiler.runner(str(f / "model.loop.onnx"), cache),
                                 "model.loop.onnx"),
           "ncnn, 2 threads": (lambda f, cache: ncnn_runtime.runner(str(f / "model.onnx"), cache, threads=2),
                               "model.onnx"),
           "litert": (lambda f, cache: litert_runtime.runner(dense_model(f), cache), "model.onnx"),
           "executorch, 1 thread": (lambda f, cache: executorch_runtime.runner(dense_model(f), cache, threads=1),
                                    "model.onnx")}
SCRIPTS = {"tvm": (tvm_infer, "*.so"), "iree": (iree_infer, "*.vmfb"), "mnn": (mnn_infer, "*.mnn"),
           "ncnn": (ncnn_infer, "*.npz"), "litert": (litert_infer, "*.tflite"), "executorch": (executorch_infer, "*.pte")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def images(mnist_dir):
    return load_test_set(mnist_dir, IMAGES)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_each_engine_answers_as_onnx_runtime(engine, tiny_models, cache, images):
    make, graph = ENGINES[engine]
    expected = onnx_runtime.runner(str(tiny_models / graph)).predict(images[0])
    with make(tiny_models, str(cache)) as runner:
        assert runner.engine is not None and runner.describe()["precision"] == "fp32"
        for count in (1, 7, IMAGES):  # each driver of IREE's auto, each of LiteRT's files, batches of every size
            logits, gates = runner.predict(images[0][:count])
            np.testing.assert_allclose(logits, expected[0][:count], atol=1e-4)
            np.testing.assert_allclose(gates, expected[1][:count], atol=1e-5)
            np.testing.assert_array_equal(logits.argmax(1), expected[0][:count].argmax(1))
    assert runner.engine is None


@pytest.mark.parametrize("script, flags", [("iree", []), ("mnn", ["--threads", "2"]),
                                           ("mnn", ["--weight-bits", "8", "--routing", "loop"]), ("tvm", []),
                                           ("ncnn", []), ("litert", []), ("executorch", ["--threads", "1"])])
def test_the_scripts_print_the_block_with_onnx_runtimes_accuracy(script, flags, tiny_models, mnist_dir, cache,
                                                                  images, tmp_path):
    before = sorted(os.listdir(tiny_models))
    results = tmp_path / "results.jsonl"
    module, built = SCRIPTS[script]
    graph = "model.loop.onnx" if "loop" in flags else "model.onnx"
    model = tiny_models / ("checkpoint.pt" if script in ("litert", "executorch") else graph)
    record, = module.main(["--model", str(model), "--data-dir", mnist_dir, "--test-limit", str(IMAGES),
                          "--latency-runs", "20", "--quiet", "--cache-dir", str(cache), "--json", str(results),
                          *[f for f in flags if f not in ("--routing", "loop")]])
    expected = onnx_runtime.runner(str(tiny_models / graph)).logits(images[0])
    accuracy = 100.0 * float((expected.argmax(1) == images[1]).mean())
    if "--weight-bits" in flags:  # int8 weights: the answers move a little
        assert abs(record["accuracy"] - accuracy) <= 1.0 and "int8 weights" in record["details"]["precision"]
    else:
        assert record["accuracy"] == pytest.approx(accuracy)
    assert {"compile", "convert", "lower"} & set(record["details"]) and record["latency_p50_us"] > 0
    assert json.loads(results.read_text())["backend"] == record["backend"]
    assert sorted(os.listdir(tiny_models)) == before  # nothing written beside the user's model
    assert any(cache.rglob(built))


@pytest.mark.parametrize("engine", ["litert", "executorch", "mnn"])
def test_the_int8_paths_keep_the_fp32_answers_within_a_point(engine, tiny_models, cache, images, mnist_dir):
    model, path = dense_model(tiny_models), str(tiny_models / "model.onnx")
    expected = onnx_runtime.runner(path).logits(images[0])
    calibration = load_split("train", mnist_dir, 200)[0].numpy()
    if engine == "litert":
        made = litert_runtime.runner(model, str(cache), int8=True)
    elif engine == "executorch":
        made = executorch_runtime.runner(model, str(cache), calibration=calibration)
    else:
        made = mnn_runtime.runner(path, str(cache), calibration=calibration)
    with made as runner:
        logits = np.concatenate([runner.logits(images[0][i:i + 100]) for i in range(0, IMAGES, 100)])
        assert runner.describe()["precision"].startswith("int8")
    assert not np.allclose(logits, expected, atol=1e-4)  # it did quantize
    agreement = float((logits.argmax(1) == expected.argmax(1)).mean())
    accuracy = (float((logits.argmax(1) == images[1]).mean()), float((expected.argmax(1) == images[1]).mean()))
    assert agreement >= 0.97 and abs(accuracy[0] - accuracy[1]) <= 0.01, (agreement, accuracy)


def test_ncnn_gets_the_gate_as_one_layer_where_pnnx_leaves_four():
    param = ("7767517\n9 11\nInput in0 0 1 in0\nInnerProduct gate 1 1 in0 5 0=8\npnnx.Expression k 0 1 6\n"
             "TopK topk 2 2 5 6 7 8\nSoftmax soft 1 1 7 9 0=1\nMemoryData zeros 0 1 10 0=8\n"
             "ScatterElements scatter 3 1 10 8 9 11\nInnerProduct head 1 1 11 out0 0=10\nNoSuchLayer x 1 1 out0 out1\n")
    rewritten = ncnn_runtime.with_gate_layer(param, 2).split("\n")
    assert rewritten[1] == "6 6"  # layers, blobs: in0, 5, 10, 11, out0, out1
    assert rewritten[2:6] == ["Input in0 0 1 in0", "InnerProduct gate 1 1 in0 5 0=8", "MemoryData zeros 0 1 10 0=8",
                              "MoEGate moe_gate 2 1 5 10 11 0=2"]
    assert ncnn_runtime.missing_layers("\n".join(rewritten)) == ["NoSuchLayer"]


def test_a_corrupt_cached_build_is_built_again_and_said(tiny_models, tmp_path, images, capsys):
    path = str(tiny_models / "model.onnx")
    with mnn_runtime.runner(path, str(tmp_path)) as first:
        expected = first.logits(images[0])
    (built,) = tmp_path.rglob("*.mnn")
    built.write_bytes(b"cut short")
    with mnn_runtime.runner(path, str(tmp_path)) as again:
        np.testing.assert_array_equal(again.logits(images[0]), expected)
    assert "could not be loaded; building it again" in capsys.readouterr().out


def test_bad_input_is_one_line(tiny_models, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    loop = str(tiny_models / "model.loop.onnx")
    cases = [(("iree_infer.py", "--model", str(tmp_path / "junk.onnx")), "junk.onnx is not an ONNX model"),
             (("iree_infer.py", "--model", loop), "loop graph, which IREE cannot run"),
             (("tvm_infer.py", "--model", loop, "--tune-trials", "1"), "--tune-trials tunes the dense graph only"),
             (("ncnn_infer.py", "--model", loop), "loop graph, which ncnn cannot run"),
             (("mnn_infer.py", "--threads", "0"), "--threads: must be a positive integer, got 0"),
             (("mnn_infer.py", "--int8", "--model", loop), "--int8 takes the dense graph only"),
             (("tvm_infer.py", "--tune-trials", "-1"), "--tune-trials: must be >= 0, got -1"),
             (("litert_infer.py", "--model", str(tmp_path / "none.pt")),
              "none.pt not found; run train.py first (or pass --model PATH)")]
    for module, script in (("MNN", "mnn_infer.py"), ("ai_edge_litert", "litert_infer.py"),
                           ("executorch", "executorch_infer.py")):
        model = tiny_models / ("model.onnx" if script == "mnn_infer.py" else "checkpoint.pt")
        hidden = (f"import runpy, sys; sys.modules[{module!r}] = None; "
                  f"sys.argv = [{script!r}, '--model', sys.argv[1]]; runpy.run_path({script!r}, run_name='__main__')")
        cases.append((("-c", hidden, str(model)), f"needs the Python module {module}"))
    for (command, expected), result in zip(cases, run_scripts(*[command for command, _ in cases])):
        line = one_line_error(result)
        assert expected in line, (command, line)
        if command[0] == "-c":
            assert "pip install -r requirements.txt" in line, line
