"""Netron in a real browser: serve a freshly exported model with the project's own --netron flag,
load it in headless Chromium, get past Netron's consent screen as a person would, and read the
rendered graph. Installs nothing: runs where Debian's chromium and chromium-driver are present
(.ci/run installs them).

NETRON_MODEL=model.onnx NETRON_SCREENSHOT=docs/model.onnx.png python -m pytest tests/test_netron_browser.py
redoes the README's screenshot from the trained model."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, train_tiny
from moebench import web

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (requirements.txt)")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed")


@pytest.fixture
def netron_server(tmp_path, mnist_dir):
    """export_onnx.py --netron --no-browser on a tiny fresh checkpoint (or NETRON_MODEL's checkpoint);
    yields (process, url, model path); stops it with Ctrl-C (SIGINT) afterwards."""
    model = os.environ.get("NETRON_MODEL")
    port = free_port()
    if model:
        command = [sys.executable, "onnx_cpu_infer.py", "--model", model, "--latency-runs", "10", "--quiet",
                   "--data-dir", mnist_dir]
    else:
        train_tiny(tmp_path, mnist_dir, name="ckpt.pt", train_images=1000, test_images=100, epochs=1, size=16)
        model = str(tmp_path / "model.onnx")
        command = [sys.executable, "export_onnx.py", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", model,
                   "--data-dir", mnist_dir, "--test-limit", "100"]
    process = subprocess.Popen(command + ["--netron", "--no-browser", "--netron-host", "127.0.0.1",
                                          "--netron-port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("Netron is serving"):
            break
    else:
        pytest.fail(f"no Netron server: {process.wait(30)} {process.stderr.read()[-500:]}")
    yield process, f"http://127.0.0.1:{port}", model
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def rendered_graph(driver):
    """Click Netron's Accept button, then wait for the graph; returns the SVG's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    def consent_button(d):
        button = d.find_element(By.ID, "message-button")
        return button if button.is_displayed() and button.text == "Accept" else False
    WebDriverWait(driver, 30).until(consent_button).click()
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg#canvas g.node"))
    return driver.execute_script("return document.getElementById('canvas').textContent")


def test_netron_shows_the_exported_graph(netron_server, tmp_path):
    import onnx
    process, url, model = netron_server
    browser = web.Browser(flags=("--disable-gpu",), window=(1400, 1250))
    driver = browser.driver
    try:
        driver.get(url)
        assert not driver.find_elements("css selector", "svg#canvas g.node")  # no graph before consent
        text = rendered_graph(driver)
        screenshot = os.environ.get("NETRON_SCREENSHOT", str(tmp_path / "netron.png"))
        driver.save_screenshot(screenshot)
    finally:
        browser.close()
    graph = onnx.load(model).graph
    for op in {node.op_type for node in graph.node} & {"Gemm", "MatMul", "TopK", "Softmax", "ScatterElements"}:
        assert op in text, op
    for name in ("pixels", "logits", "gates"):
        assert name in text, name
    assert os.path.getsize(screenshot) > 20_000
    process.send_signal(signal.SIGINT)  # Ctrl-C stops the server cleanly
    assert process.wait(30) == 0
    assert "Traceback" not in process.stderr.read()
