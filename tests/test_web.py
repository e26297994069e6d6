"""The model in a real browser: web_infer.py runs it with onnxruntime-web in headless Chromium and
agrees with ONNX Runtime in Python, says how many threads ran, and says WebGPU is missing where it
is; the drawing page, drawn on through Selenium, shows what onnxruntime in Python computes for the
same pixels; bad input is one line. Runs where Chromium, chromedriver and web/node_modules are
(bash tests/install_tools.sh).

WEB_MODEL=model.onnx WEB_SCREENSHOT=docs/web-demo.png python -m pytest tests/test_web.py -k drawing
redoes the README's screenshot from the trained model."""
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ROOT, free_port
from moebench import web
from moebench.serving.server_process import ServerProcess

pytest.importorskip("selenium", reason="selenium is not installed (requirements.txt)")
pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver") and os.path.isdir(web.ORT_FOLDER)),
    reason="needs chromium, chromedriver and web/node_modules (bash tests/install_tools.sh)")


def web_infer(*args, env=None):
    return subprocess.run([sys.executable, "web_infer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def python_logits(model, pixels_uint8):
    import onnxruntime as ort
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pixels = (np.asarray(pixels_uint8, np.float32) / 255).reshape(-1, 1, 28, 28)
    return session.run(["logits", "gates"], {"pixels": pixels})


def test_web_infer_agrees_with_python_and_says_what_ran(tiny_models, mnist_dir, tmp_path):
    from data import load_split
    log = tmp_path / "results.jsonl"
    result = web_infer("--model", str(tiny_models / "model.onnx"), "--test-limit", "300", "--latency-runs", "50",
                       "--threads", "2", "--json", str(log), "--quiet", "--data-dir", mnist_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(log.read_text().splitlines()[0])
    images, labels = load_split("test", mnist_dir, 300)
    pixels = np.round(images.numpy() * 255).astype(np.uint8)
    expected = 100.0 * float((python_logits(tiny_models / "model.onnx", pixels)[0].argmax(1) == labels.numpy()).mean())
    assert record["accuracy"] == pytest.approx(expected, abs=1e-9) and record["images"] == 300
    assert record["backend"].startswith("ONNX Runtime Web, WebAssembly SIMD (2 threads")
    assert record["details"]["threads"].startswith("2 (cross-origin isolated: yes")
    assert "100.00% the same class" in record["details"]["vs Python"]
    assert ".wasm" in record["details"]["provider"] and record["versions"]["onnxruntime-web"] == web.ORT_WEB_VERSION
    assert 0 < record["latency_p50_us"] <= record["latency_p99_us"] and record["test_set_s"] > 0
    webgpu = [line for line in result.stdout.splitlines() if "WebGPU" in line]
    assert len(webgpu) == 1 and ("not available here" in webgpu[0] or webgpu[0].startswith("== "))


def draw(driver, strokes):
    """Mouse strokes on the drawing canvas, in its own pixel coordinates (0..280)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    pad = driver.find_element(By.ID, "pad")
    for points in strokes:
        chain = ActionChains(driver, duration=0)
        chain.move_to_element_with_offset(pad, points[0][0] - 140, points[0][1] - 140).click_and_hold()
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            chain.move_by_offset(xb - xa, yb - ya)
        chain.release().perform()


def test_the_drawing_page_shows_what_onnxruntime_computes_for_the_same_pixels(tiny_models):
    from selenium.webdriver.common.by import By
    model = os.environ.get("WEB_MODEL") or str(tiny_models / "model.onnx")
    port = free_port()
    server = ServerProcess([sys.executable, "web_infer.py", "--demo", "--model", model, "--port", str(port)], ROOT,
                           port, ready="serving the drawing page")
    browser = web.Browser()
    try:
        driver = browser.driver
        driver.get(f"http://127.0.0.1:{port}/")
        browser.wait_for("window.demoState.ready || window.demoState.error || null", 60)
        assert driver.execute_script("return window.demoState.error || null") is None
        draw(driver, [[(70, 50), (210, 50), (120, 240)], [(110, 150), (180, 150)]])  # a seven, crossed
        state = browser.wait_for("window.demoState.runs >= 1 ? window.demoState : null", 60)
        pixels = np.asarray(state["pixels"], np.float64).reshape(28, 28)
        rows, cols = np.indices(pixels.shape)
        spans = [np.ptp(np.flatnonzero(pixels.sum(axis))) + 1 for axis in (1, 0)]
        assert max(spans) in (19, 20, 21) and min(spans) <= 20, spans  # MNIST's way: the ink fitted into 20x20,
        centre = (float((rows * pixels).sum() / pixels.sum()), float((cols * pixels).sum() / pixels.sum()))
        assert abs(centre[0] - 13.5) < 1.5 and abs(centre[1] - 13.5) < 1.5, centre  # its centre of mass centred
        logits, gates = python_logits(model, state["pixels"])
        np.testing.assert_allclose(state["logits"], logits[0], atol=1e-4)
        np.testing.assert_allclose(state["gates"], gates[0], atol=1e-5)
        assert state["answer"] == int(logits[0].argmax())
        assert driver.find_element(By.ID, "answer").text == str(state["answer"])
        chosen = driver.find_elements(By.CSS_SELECTOR, ".expert.chosen")
        assert [c.text.split()[1] for c in chosen] == [str(e) for e in np.flatnonzero(gates[0])]
        assert "inference" in driver.find_element(By.ID, "timing").text
        if os.environ.get("WEB_SCREENSHOT"):
            save_page_picture(driver, os.environ["WEB_SCREENSHOT"])
        driver.find_element(By.ID, "clear").click()
        assert driver.find_element(By.ID, "answer").text == "?"
    finally:
        browser.close()
        server.stop()


def save_page_picture(driver, path):
    """The page's screenshot cut to what it shows (the window is wider and taller than the page)."""
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By
    right = max(e.rect["x"] + e.rect["width"] for e in driver.find_elements(By.CSS_SELECTOR, "#timing, #experts"))
    clear = driver.find_element(By.ID, "clear").rect
    picture = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    picture.crop((0, 0, int(right) + 16, int(clear["y"] + clear["height"]) + 16)).save(path)


def no_gates_model(path):
    """A model with the right input and logits but no 'gates' output."""
    node = helper.make_node("Flatten", ["pixels"], ["flat"])
    take = helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["logits"])
    constants = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                 for name, value in (("starts", 0), ("ends", 10), ("axes", 1))]
    graph = helper.make_graph([node, take], "no-gates",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def wrong_input_model(path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "wrong",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_bad_input_is_one_line(tiny_models, tmp_path):
    model = str(tiny_models / "model.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [
            (["--model", str(tmp_path / "missing.onnx")], None, "missing.onnx not found"),
            (["--model", wrong_input_model(tmp_path / "wrong.onnx")], None, "breaks the model contract"),
            (["--demo", "--model", no_gates_model(tmp_path / "plain.onnx")], None, "has no 'gates' output"),
            (["--demo", "--model", model, "--port", str(taken.getsockname()[1])], None, "cannot serve there"),
            (["--model", model, "--test-limit", "10"], {**os.environ, "PATH": "/nonexistent"},
             "no Chromium and chromedriver on the PATH"),
            (["--threads", "-1"], None, "--threads: must be >= 0"),
        ]
        with ThreadPoolExecutor(2) as pool:  # each is mostly one process's imports, on one core
            results = list(pool.map(lambda case: web_infer(*case[0], env=case[1]), cases))
        for (args, _, expected), result in zip(cases, results):
            assert result.returncode != 0, args
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], (args, result.stderr[-1000:])


def test_without_onnxruntime_web_installed_it_says_how_to_install_it(tiny_models, monkeypatch, tmp_path):
    import web_infer
    from moebench.cli import UserError
    monkeypatch.setattr(web, "ORT_FOLDER", str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"npm ci --prefix web"):
        web_infer.main(["--model", str(tiny_models / "model.onnx"), "--test-limit", "10"])
