"""serve.py for real: a Ray Serve application on a free local port, answered over HTTP with test
images and bad requests, overloaded, a replica killed, stopped with Ctrl-C; LoadGen against it."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import loadgen
from conftest import ROOT
from moebench.runners import onnx_runtime, registry
from data import load_split
from test_backends import one_line_error, run_script

IMAGES = 200


def post(url, body, content_type="application/octet-stream", timeout=30):
    """(status, parsed JSON) of one POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def test_images(mnist_dir):
    images, labels = load_split("test", mnist_dir, IMAGES)
    return np.round(images.numpy()[:, 0] * 255).astype(np.uint8), labels.numpy()


@pytest.fixture(scope="module")
def expected(tiny_models, test_images):
    """What ONNX Runtime itself says for the same uint8 pixels: (logits, gates)."""
    session = onnx_runtime.create_session(str(tiny_models / "model.onnx"), ["CPUExecutionProvider"])
    pixels = (test_images[0].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    return session.run(["logits", "gates"], {"pixels": pixels})


@pytest.fixture(scope="module")
def server(tiny_models):
    port = loadgen.free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"),
                                "--port", str(port), "--threads", "1", "--max-batch-size", "8",
                                "--max-ongoing", "2", "--max-queued", "2", "--max-images", "500"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("serving "):
            break
    else:
        pytest.fail(f"serve.py did not start: {process.wait(30)} {process.stderr.read()[-800:]}")
    yield process, f"http://127.0.0.1:{port}/", port
    if process.poll() is None:
        process.kill()


def check_answers(predictions, expected, rows):
    logits, gates = expected
    for answer, row in zip(predictions, rows):
        assert answer["class"] == int(logits[row].argmax())
        np.testing.assert_allclose(answer["logits"], logits[row], atol=1e-4)
        chosen = {e["expert"]: e["weight"] for e in answer["experts"]}
        assert set(chosen) == set(np.flatnonzero(gates[row]).tolist())
        assert all(abs(w - gates[row][e]) < 1e-4 for e, w in chosen.items())


def test_raw_and_json_requests_get_what_onnxruntime_says(server, test_images, expected):
    _, url, _ = server
    status, answer = post(url, test_images[0].tobytes())
    assert status == 200 and len(answer["predictions"]) == IMAGES
    check_answers(answer["predictions"], expected, range(IMAGES))
    for images in ([test_images[0][5].reshape(784).tolist(), test_images[0][6].reshape(784).tolist()],
                   [test_images[0][5].tolist(), test_images[0][6].tolist()]):  # flat, or 28 rows of 28
        status, answer = post(url, json.dumps({"images": images}).encode(), "application/json")
        assert status == 200
        check_answers(answer["predictions"], expected, [5, 6])
    assert json.loads(urllib.request.urlopen(url, timeout=30).read())["backend"] == "onnxruntime"


@pytest.mark.parametrize("body, content_type, status, says", [
    (b"", "application/octet-stream", 400, "empty body"),
    (bytes(785), "application/octet-stream", 400, "not a whole number of 28x28"),
    (bytes(784 * 501), "application/octet-stream", 413, "501 images in one request; at most 500"),
    (b"{not json", "application/json", 400, "bad JSON"),
    (b'{"images": [[1, 2, 3]]}', "application/json", 400, "each must be 784 numbers or 28x28"),
    (json.dumps({"images": [[300] * 784]}).encode(), "application/json", 400, "from 0 to 255"),
    (b'{"pictures": []}', "application/json", 400, "non-empty list under"),
])
def test_bad_requests_get_a_4xx_and_the_replica_lives_on(server, test_images, body, content_type, status, says):
    _, url, _ = server
    before = post(url, test_images[0][:1].tobytes())[1]["served_by"]
    got, answer = post(url, body, content_type)
    assert got == status and says in answer["error"], answer
    assert "\n" not in answer["error"]
    assert post(url, test_images[0][:1].tobytes())[1]["served_by"] == before


def test_overload_is_refused_with_503_and_every_answer_is_right(server, test_images, expected):
    import aiohttp
    _, url, _ = server
    rows = list(range(IMAGES)) * 2

    async def flood():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(rows))) as session:
            async def one(row):
                async with session.post(url, data=test_images[0][row].tobytes()) as response:
                    return row, response.status, await response.read()
            return await asyncio.gather(*[one(row) for row in rows])
    results = asyncio.run(flood())
    statuses = [status for _, status, _ in results]
    assert 503 in statuses and 200 in statuses, sorted(set(statuses))
    assert set(statuses) <= {200, 503}
    for row, status, body in results:
        if status == 200:
            check_answers(json.loads(body)["predictions"], expected, [row])


def test_a_killed_replica_is_replaced_and_no_answer_is_wrong(server, test_images, expected):
    _, url, _ = server
    victim = post(url, test_images[0][:1].tobytes())[1]["served_by"]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline, errors, row = time.time() + 90, 0, 0
    while time.time() < deadline:
        row = (row + 1) % IMAGES
        try:
            status, answer = post(url, test_images[0][row:row + 1].tobytes(), timeout=10)
        except (OSError, ValueError):
            status, answer = None, {}
        if status != 200:
            errors += 1
            time.sleep(0.2)
            continue
        check_answers(answer["predictions"], expected, [row])
        if answer["served_by"]["pid"] != victim:
            return
    pytest.fail(f"no new replica within 90 s ({errors} errors)")


def test_loadgen_runs_every_scenario_end_to_end(server, tiny_models, mnist_dir, tmp_path):
    _, url, _ = server
    report = loadgen.main(["--quick", "--server-url", url, "--model", str(tiny_models / "model.onnx"),
                           "--data-dir", mnist_dir, "--test-limit", "600", "--out-dir", str(tmp_path)])
    row = report["in_process"][registry.REFERENCE]
    assert row["single_stream"]["p90_ns"] > 0 and row["offline"]["samples_per_s"] > 0
    assert row["loadgen"]["accuracy"] == pytest.approx(row["direct_accuracy"])
    served = report["server"][f"serve.py at {url}"]
    assert served["loadgen"]["accuracy"] == pytest.approx(served["direct_accuracy"])
    assert served["ladder"]["steps"] and report["server"][loadgen.BASELINE]["ladder"]["steps"]
    logs = tmp_path / "loadgen" / "onnx-runtime-cpu-dense-torchscript"
    for scenario in ("singlestream", "offline"):
        assert "Result is : VALID" in (logs / scenario / "mlperf_log_summary.txt").read_text()
    for scenario in ("singlestream", "offline", "accuracy"):
        assert "test_mode" in (logs / scenario / "mlperf_log_detail.txt").read_text()
    assert (tmp_path / "loadgen.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Server" in (tmp_path / "loadgen.md").read_text()


def test_a_taken_port_is_one_clear_line(server, tiny_models):
    _, _, port = server
    line = one_line_error(run_script("serve.py", "--model", str(tiny_models / "model.onnx"), "--port", str(port)))
    assert f"--port {port}: cannot listen there" in line


def test_ctrl_c_stops_the_server_cleanly(server):
    process, url, _ = server
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and out.strip().endswith("stopped")
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def test_refuses_a_model_without_gates_and_an_unreachable_cluster(tmp_path, tiny_models):
    import onnx
    model = onnx.load(str(tiny_models / "model.onnx"))
    del model.graph.output[1]
    onnx.save(model, str(tmp_path / "no-gates.onnx"))
    line = one_line_error(run_script("serve.py", "--model", str(tmp_path / "no-gates.onnx")))
    assert "has no 'gates' output" in line
    line = one_line_error(run_script("serve.py", "--model", str(tiny_models / "model.onnx"),
                                     "--address", f"127.0.0.1:{loadgen.free_port()}"))
    assert "no Ray cluster answers there" in line
