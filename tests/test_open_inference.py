"""The Open Inference Protocol (KServe v2) as a Triton user meets it: serve.py's /v2 endpoints driven
by tritonclient (both servers), Triton Inference Server itself (serve.py --triton) with the same
answers and a clean Ctrl-C, and serve.py under wrk, the C load generator: refusals past the queue,
never a wrong answer."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, check_answers, free_port, post
from moebench.measuring import http_load, wrk
from moebench.serving import kserve
from moebench.serving.requests import RequestError
from moebench.serving.server_process import ServerProcess

httpclient = pytest.importorskip("tritonclient.http")


def client_for(url):
    return httpclient.InferenceServerClient(url.removeprefix("http://").rstrip("/"))


def infer(client, pixels, datatype="FP32", binary=True):
    tensor = httpclient.InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "gates")]
    answer = client.infer(kserve.MODEL, [tensor], outputs=outputs)
    return answer.as_numpy("logits"), answer.as_numpy("gates")


def speaks_the_one_protocol(url, images, expected):
    """What a Triton user's client does, the same against each of the three servers: health, metadata,
    inference with binary and JSON FP32 tensors (the ONNX model's answers), and a UINT8 tensor or an
    image shape the metadata does not name refused with a 400."""
    client = client_for(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(kserve.MODEL)
    metadata = client.get_model_metadata(kserve.MODEL)
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "gates"]
    pixels = (images.astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    for binary in (True, False):
        got_logits, got_gates = infer(client, pixels, binary=binary)
        np.testing.assert_allclose(got_logits, expected[0][:len(images)], atol=1e-5)
        np.testing.assert_allclose(got_gates, expected[1][:len(images)], atol=1e-6)
    for refused in (images.reshape(-1, 784), pixels.reshape(-1, 784)):
        with pytest.raises(httpclient.InferenceServerException) as error:
            infer(client, refused, "UINT8" if refused.dtype == np.uint8 else "FP32")
        assert error.value.status() == "400", error.value
    return got_logits


def test_tritonclient_gets_the_same_answers_as_the_own_api(server, served_images, served_expected):
    _, url, _ = server
    images = served_images[0][:6]
    logits = speaks_the_one_protocol(url, images, served_expected)
    status, own = post(url, images.tobytes())
    assert status == 200 and [p["class"] for p in own["predictions"]] == logits.argmax(1).tolist()


@pytest.mark.parametrize("header, says", [
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 784}]}, "named \"pixels\""),
    ({"inputs": [{"name": "pixels", "datatype": "FP64", "shape": [1, 1, 28, 28], "data": [0] * 784}]}, "datatype"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 5], "data": [0] * 5}]}, "input shape"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 7}]}, "has 7 values"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [2] * 784}]}, "from 0 to 1"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [501, 1, 28, 28], "data": [0]}]}, "at most 500"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 784}],
      "outputs": [{"name": "probabilities"}]}, "no output 'probabilities'"),
])
def test_bad_infer_requests_are_a_4xx_in_one_line(server, header, says):
    _, url, _ = server
    status, answer = post(url + "v2/models/moe/infer", json.dumps(header).encode())
    assert 400 <= status < 500 and says in answer["error"] and "\n" not in answer["error"], answer
    assert post(url + "v2/models/other/infer", b"{}")[0] == 404


def test_binary_requests_and_answers_round_trip():
    pixels = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    body, headers = kserve.request_body(pixels)
    parsed, request_id, wanted = kserve.parse_infer(body, headers["Inference-Header-Content-Length"], 10)
    np.testing.assert_array_equal(parsed, pixels)
    assert request_id is None and wanted == {"logits": True, "gates": True}
    answer, length = kserve.encode_infer(np.ones((3, 10)), np.zeros((3, 8)), "7", {"logits": True, "gates": False})
    arrays = kserve.read_answer(answer, str(length))
    assert arrays["logits"].shape == (3, 10) and arrays["gates"].shape == (3, 8) and arrays["logits"].sum() == 30
    with pytest.raises(RequestError, match="binary_data_size"):
        kserve.parse_infer(body[:-4], headers["Inference-Header-Content-Length"], 10)
    assert kserve.route("/v2/models/moe/versions/1/infer") == "infer" and kserve.route("/v2/models/moe/x") is None


needs_triton = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="needs nvidia-pytriton (pip install --no-deps -r requirements-nodeps.txt)")


@needs_triton
def test_triton_speaks_the_same_protocol_from_an_unactivated_virtualenv_and_ctrl_c_leaves_no_process(
        tiny_models, served_images, served_expected):
    """serve.py --triton run as `.venv/bin/python serve.py --triton`, the virtualenv not on PATH; Triton's
    own metrics on --port + 2 count the requests it answered."""
    port = free_port()
    started = ServerProcess(["env", f"PATH={os.defpath}", sys.executable, "serve.py", "--model",
                             str(tiny_models / "model.onnx"), "--triton", "--port", str(port), "--max-batch-size", "16"],
                            ROOT, port)
    try:
        speaks_the_one_protocol(started.url, served_images[0][:6], served_expected)
        classes = http_load.classes_over_v2(started.url, served_images[0], batch=7)
        assert (classes == served_expected[0].argmax(1)).all()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port + 2}/metrics", timeout=5).read().decode()
        counted = {line.split("{")[0]: float(line.split()[-1]) for line in scraped.splitlines()
                   if line.startswith(("nv_inference_request_success{", "nv_inference_count{")) and 'model="moe"' in line}
        images = len(served_images[0])
        assert counted == {"nv_inference_request_success": 2 + -(-images // 7), "nv_inference_count": 12 + images}
        children = subprocess.run(["pgrep", "-P", str(started.process.pid)], capture_output=True, text=True).stdout
        assert children.split(), "no tritonserver under serve.py"
    finally:
        started.process.send_signal(signal.SIGINT)
        code = started.process.wait(60)
        output = started.output()
        started.stop()
    assert code == 0 and output.rstrip().endswith("stopped"), output[-500:]
    for pid in children.split():
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0, f"tritonserver {pid} lives on"


def test_triton_refuses_other_backends_in_one_line(tiny_models):
    from conftest import one_line_error, run_script
    result = run_script("serve.py", "--model", str(tiny_models / "model.onnx"), "--triton", "--backend", "openvino")
    assert "--triton serves the ONNX model with ONNX Runtime" in one_line_error(result)


@pytest.mark.skipif(not wrk.available(), reason="needs wrk (bash tests/install_tools.sh)")
def test_under_wrk_a_full_queue_is_refused_and_answers_stay_right(server, served_images, served_expected):
    """The fixture's queue holds two requests: 64 connections from a C client overflow it."""
    _, url, _ = server
    result = wrk.load(url, served_images[0][:1].tobytes(), {"Content-Type": "application/octet-stream"}, 64, 2)
    assert result["requests"] > 100 and result["non_2xx"] > 0 and result["errors"] == 0, result
    for _ in range(50):  # what wrk left queued drains first; a refusal is allowed, a wrong answer never
        status, answer = post(url, served_images[0].tobytes())
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 200, answer
    check_answers(answer["predictions"], served_expected, range(len(served_images[0])))
