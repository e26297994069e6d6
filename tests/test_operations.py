"""What an operator of serve.py's default server relies on: GET /metrics in Prometheus's format whose
counts add up to what a C load generator sent; a client that goes away before its images are
computed costs no model call; a model swapped under load (the Open Inference Protocol's repository
extension, and SIGHUP) drops no request, and one that breaks the contract is refused. The server
has two workers, so that what one worker is told, the other follows."""
import json
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, free_port, get, post
from raw_http import post_head, raw_request, status_of
from scraped import grown, settled_scrape, total
from moebench.measuring import h2load, http_load, operations, wrk
from moebench.serving import grpc_api
from moebench.serving.repository import ORDER_POLL_S
from moebench.serving.server_process import ServerProcess

QUEUED = 32


@pytest.fixture(scope="module")
def server(tiny_models):
    """serve.py as an operator starts it, gRPC beside HTTP, its queue long enough for the clients here
    to wait in it: (process, url, port, gRPC port)."""
    port, grpc_port = free_port(), free_port()
    started = ServerProcess([sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"),
                             "--port", str(port), "--grpc-port", str(grpc_port), "--threads", "1",
                             "--max-batch-size", "8", "--max-queued", str(QUEUED), "--replicas", "2"], ROOT, port)
    yield started, started.url, port, grpc_port
    started.stop()


@pytest.mark.skipif(not wrk.available(), reason="needs wrk (bash tests/install_tools.sh)")
def test_metrics_count_every_request_wrk_sent(server, served_images):
    """Twice as many connections as the two workers' queues hold, so some get 503s; wrk counts the
    answers it read, and the server may have answered up to one more per connection when wrk stopped."""
    url = server[1]
    connections = 2 * 2 * QUEUED
    before = settled_scrape(url)
    result = wrk.load(url, served_images[0][:1].tobytes(), {"Content-Type": "application/octet-stream"},
                      connections, 2)
    after = settled_scrape(url)
    answered = grown(before, after, "moe_requests_total", route="/")
    assert result["requests"] <= answered <= result["requests"] + connections, (result, answered)
    refused = grown(before, after, "moe_requests_total", route="/", status="503")
    assert 0 < refused and abs(refused - result["non_2xx"]) <= connections, (result, refused)
    assert grown(before, after, "moe_request_seconds_count", route="/") == answered
    computed = grown(before, after, "moe_requests_total", route="/", status="200")
    # each request is one image: the images of the model calls are the requests that got an answer
    assert grown(before, after, "moe_batch_images_sum") == computed
    assert grown(before, after, "moe_queue_wait_seconds_count") == computed
    assert grown(before, after, "moe_model_call_seconds_count") > 0
    assert total(after, "moe_requests_waiting") == 0


@pytest.mark.skipif(not wrk.available(), reason="needs wrk (bash tests/install_tools.sh)")
def test_servers_measured_in_turns_each_get_every_turn(server, served_images):
    """http_load.interleaved, which measures what the metrics cost (here one server under two names)."""
    request = http_load.bodies(served_images[0][0])["own"]
    shown = []
    found = http_load.interleaved({"a": server[1], "b": server[1]}, request, [4, 8], 1, 2, shown.append)
    assert list(found) == [4, 8] and all(len(runs) == 2 and min(runs) > 0 for by_name in found.values()
                                         for runs in by_name.values())
    assert len(shown) == 2 and "medians of 2 turns" in shown[0]


@pytest.mark.skipif(not h2load.available(), reason="needs h2load (bash tests/install_tools.sh)")
def test_h2load_drives_grpc_and_every_call_is_answered(server, served_images):
    """What loadgen.py measures gRPC with: h2load sending ModelInfer frames. h2load sees HTTP statuses
    only: the server's metrics say each call was answered. (The request is built with tritonclient's
    generated classes: grpc_api's, compiled from the same proto in this process, would clash with
    them in protobuf's pool; loadgen.py uses grpc_api's.)"""
    from tritonclient.grpc import service_pb2
    pixels = (served_images[0][:1] / 255).astype(np.float32).reshape(1, 1, 28, 28)
    request = service_pb2.ModelInferRequest(model_name="moe")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(pixels.tobytes())
    before = settled_scrape(server[1])
    result = h2load.load(f"http://127.0.0.1:{server[3]}/{grpc_api.INFER_PATH}",
                         h2load.grpc_frame(request.SerializeToString()), h2load.GRPC_HEADERS, 4, 1, warm_up_s=0)
    answered = grown(before, settled_scrape(server[1]), "moe_requests_total", route="grpc", status="200")
    assert result["requests"] > 50 and result["failed"] == 0, result
    assert result["requests"] <= answered <= result["requests"] + 4, (result, answered)


def test_a_client_gone_before_its_turn_is_not_computed(server, served_images):
    """Two big requests keep the model busy; the clients sent behind them close their connections at
    once. Those still waiting when their turn comes are dropped, counted, and never computed; a body
    cut short by its client leaving is not parsed as a request (no 400), only counted."""
    _, url, port, _ = server
    before = settled_scrape(url)
    big = served_images[0].tobytes() * 2  # 400 images: 50 model calls of 8
    one = served_images[0][:1].tobytes()
    keep = [raw_request(port, post_head(len(big)), big) for _ in range(2)]
    for _ in range(QUEUED - 4):
        raw_request(port, post_head(len(one)), one).close()
    raw_request(port, post_head(len(one)), one[:10]).close()  # and one that leaves before its body is whole
    for connection in keep:
        assert status_of(connection) == 200
        connection.close()
    after = settled_scrape(url)
    abandoned = grown(before, after, "moe_abandoned_requests_total")
    assert abandoned > 0 and grown(before, after, "moe_requests_total", status="499") == abandoned + 1
    computed = grown(before, after, "moe_requests_total", route="/", status="200")
    assert grown(before, after, "moe_batch_images_sum") == 2 * 400 + computed - 2



def expected_logits(model, pixels):
    from moebench.runners import onnx_runtime
    session = onnx_runtime.create_session(str(model), ["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": (pixels.astype(np.float32) / 255).reshape(-1, 1, 28, 28)})[0]


def test_a_model_swapped_under_load_drops_no_request(server, tiny_models, small_models, served_images):
    """While wrk sends, the server is told to load another model, SIGHUP loads --model again, and the
    other model once more (operations.swap_under_wrk, as loadgen.py measures it): no request fails or
    is refused, and every answer a checking client reads is wholly the old model's or the new one's."""
    pixels = served_images[0][:20]
    models = {"old": tiny_models / "model.onnx", "new": small_models / "model.onnx"}
    expected = {name: expected_logits(path, pixels) for name, path in models.items()}
    found = operations.swap_under_wrk(server[0], models["new"], pixels, expected, 8, 4)
    result = found["wrk"]
    assert result["errors"] == 0 and result["non_2xx"] == 0 and result["requests"] > 100, result
    assert found["failed"] == 0 and found["answers"]["neither"] == 0, found
    assert found["answers"]["old"] and found["answers"]["new"], found
    assert followed(server[1], models["new"])


def followed(url, model, workers=2, timeout_s=30):
    """Whether every worker serves `model` within `timeout_s` (each makes it after it reads the order):
    GET / names the answering worker's pid and the file it serves (none while unloaded), and the
    kernel hands each new connection to either worker, so each worker's latest answer is kept until
    all `workers` have said `model`."""
    latest, deadline = {}, time.time() + timeout_s
    while time.time() < deadline:
        status, about = get(url)
        latest[about["pid"]] = about.get("path") if status == 200 else None
        if len(latest) >= workers and set(latest.values()) == {str(model)}:
            return True
        time.sleep(0.02)
    return False


def test_a_model_that_breaks_the_contract_is_refused_and_unload_and_load_bring_it_back(server, tiny_models, tmp_path,
                                                                                       served_images):
    url = server[1]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    status, answer = post(url + "v2/repository/models/moe/load",
                          json.dumps({"parameters": {"path": str(broken)}}).encode())
    assert status == 400 and "not an ONNX model" in answer["error"] and "goes on serving" in answer["error"], answer
    assert post(url, served_images[0][:1].tobytes())[0] == 200
    assert post(url + "v2/repository/models/moe/unload", b"") == (200, {})
    time.sleep(4 * ORDER_POLL_S)  # the other worker follows: unloading makes nothing
    for _ in range(4):
        status, answer = post(url, served_images[0][:1].tobytes())
        assert status == 503 and "POST /v2/repository/models/moe/load" in answer["error"], answer
    assert post(url + "v2/repository/models/moe/load", b"{}") == (200, {})  # --model, as started
    assert followed(url, tiny_models / "model.onnx")
    assert post(url, served_images[0][:1].tobytes())[0] == 200


def test_tritonclient_grpc_gets_what_http_gets(server, served_images, served_expected):
    """The Open Inference Protocol over gRPC, driven as a Triton user drives Triton: health, metadata,
    and inference with FP32 tensors (a UINT8 one refused, as Triton refuses it), whose answers are the ONNX model's, as over HTTP."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server[3]}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("moe")
    metadata = client.get_model_metadata("moe", as_json=True)
    assert [t["name"] for t in metadata["outputs"]] == ["logits", "gates"]
    logits, gates = served_expected
    pixels = (served_images[0] / 255).astype(np.float32).reshape(-1, 1, 28, 28)
    wanted = [grpcclient.InferRequestedOutput(name) for name in ("logits", "gates")]
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    answer = client.infer("moe", [tensor], outputs=wanted)
    np.testing.assert_allclose(answer.as_numpy("logits"), logits, atol=1e-4)
    np.testing.assert_allclose(answer.as_numpy("gates"), gates, atol=1e-4)
    tensor = grpcclient.InferInput("pixels", [1, 784], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 784), np.uint8))
    with pytest.raises(grpcclient.InferenceServerException, match="input datatype 'UINT8'; this model takes FP32"):
        client.infer("moe", [tensor])
