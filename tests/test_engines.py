"""The compiler and the mobile runtime (IREE, MNN) on the tiny model: ONNX Runtime's answers, their
scripts' blocks, caches kept out of the user's folder and built again when corrupt, and bad input in
one line."""
import json
import os

import numpy as np
import pytest

import iree_infer
import mnn_infer
from conftest import ROOT, one_line_error, run_script
from moebench.runners import iree_runtime, mnn_runtime, onnx_runtime
from moebench.test_set import load_test_set

IMAGES = 300
ENGINES = {"iree auto": (lambda path, cache: iree_runtime.runner(path, cache), "model.onnx"),
           "iree local-task": (lambda path, cache: iree_runtime.runner(path, cache, "local-task"), "model.onnx"),
           "mnn dense": (lambda path, cache: mnn_runtime.runner(path, cache), "model.onnx"),
           "mnn loop, 2 threads": (lambda path, cache: mnn_runtime.runner(path, cache, threads=2), "model.loop.onnx")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def images(mnist_dir):
    return load_test_set(mnist_dir, IMAGES)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_each_engine_answers_as_onnx_runtime(engine, tiny_models, cache, images):
    make, graph = ENGINES[engine]
    path = str(tiny_models / graph)
    expected = onnx_runtime.runner(path).predict(images[0])
    with make(path, str(cache)) as runner:
        assert runner.engine is not None and runner.describe()["precision"] == "fp32"
        for count in (1, 7, IMAGES):  # each driver of IREE's auto, and batches of every size
            logits, gates = runner.predict(images[0][:count])
            np.testing.assert_allclose(logits, expected[0][:count], atol=1e-4)
            np.testing.assert_allclose(gates, expected[1][:count], atol=1e-5)
            np.testing.assert_array_equal(logits.argmax(1), expected[0][:count].argmax(1))
    assert runner.engine is None


@pytest.mark.parametrize("script, flags", [(iree_infer, []), (mnn_infer, ["--threads", "2"]),
                                           (mnn_infer, ["--weight-bits", "8", "--routing", "loop"])])
def test_the_scripts_print_the_block_with_onnx_runtimes_accuracy(script, flags, tiny_models, mnist_dir, cache,
                                                                  images, tmp_path):
    before = sorted(os.listdir(tiny_models))
    results = tmp_path / "results.jsonl"
    graph = "model.loop.onnx" if "loop" in flags else "model.onnx"
    record = script.main(["--model", str(tiny_models / graph), "--data-dir", mnist_dir, "--test-limit", str(IMAGES),
                          "--latency-runs", "20", "--quiet", "--cache-dir", str(cache), "--json", str(results),
                          *[f for f in flags if f not in ("--routing", "loop")]])
    expected = onnx_runtime.runner(str(tiny_models / graph)).logits(images[0])
    accuracy = 100.0 * float((expected.argmax(1) == images[1]).mean())
    if "--weight-bits" in flags:  # int8 weights: the answers move a little
        assert abs(record["accuracy"] - accuracy) <= 1.0 and "int8 weights" in record["details"]["precision"]
    else:
        assert record["accuracy"] == pytest.approx(accuracy)
    assert {"compile", "convert"} & set(record["details"]) and record["latency_p50_us"] > 0
    assert json.loads(results.read_text())["backend"] == record["backend"]
    assert sorted(os.listdir(tiny_models)) == before  # nothing written beside the user's model
    assert any(cache.rglob("*.vmfb" if script is iree_infer else "*.mnn"))


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
    assert "junk.onnx is not an ONNX model" in one_line_error(run_script("iree_infer.py", "--model",
                                                                         str(tmp_path / "junk.onnx")))
    line = one_line_error(run_script("iree_infer.py", "--model", str(tiny_models / "model.loop.onnx")))
    assert "loop graph, which IREE cannot run" in line
    assert "--threads: must be a positive integer, got 0" in one_line_error(run_script("mnn_infer.py", "--threads", "0"))
    hidden = ("import runpy, sys; sys.modules['MNN'] = None; sys.argv = ['mnn_infer.py', '--model', sys.argv[1]]; "
              "runpy.run_path('mnn_infer.py', run_name='__main__')")
    line = one_line_error(run_script("-c", hidden, str(tiny_models / "model.onnx")))
    assert "needs the Python module MNN" in line and "pip install -r requirements.txt" in line
    assert os.path.isfile(os.path.join(ROOT, "mnn_infer.py"))
