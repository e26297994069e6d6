"""Hostile clients against the three servers: the default and --ray refuse a declared length past
the limit from the header, and clients that stall mid-body take the service away from none of them
(Triton neither refuses from the header nor times a body out: docs/serving.md)."""
import importlib.util
import socket
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import BODY_TIMEOUT_S, ROOT, check_answers, free_port, post
from moebench.serving import kserve
from moebench.serving.server_process import ServerProcess
from raw_http import post_head, raw_request, status_of


def test_a_declared_length_past_the_limit_is_refused_before_the_body(server, served_images):
    _, _, port = server
    client = raw_request(port, post_head(10_000_000_000), served_images[0][0].tobytes())
    started = time.perf_counter()
    try:
        assert status_of(client) == 413
    finally:
        client.close()
    assert time.perf_counter() - started < BODY_TIMEOUT_S  # from the header, not after a wait for the body


def test_clients_stalled_mid_body_cannot_take_the_service_away(server, served_images, served_expected):
    """Two hundred clients send their headers and 10 of 784 body bytes, then stall: normal requests
    are answered, right, within a second each meanwhile, and a stalled client gets a 408 once its time
    to arrive is up (or, from Ray Serve, a 503)."""
    _, url, port = server
    stalled = [raw_request(port, post_head(784), served_images[0][0].tobytes()[:10]) for _ in range(200)]
    try:
        time.sleep(0.5)
        for row in range(5):
            started = time.perf_counter()
            status, answer = post(url, served_images[0][row].tobytes(), timeout=BODY_TIMEOUT_S + 10)
            assert status == 200, answer
            assert time.perf_counter() - started < 1.0
            check_answers(answer["predictions"], served_expected, [row])
        refused = [status_of(client) for client in stalled]
        assert set(refused) <= {408, 503, None} and 408 in refused, sorted(set(refused))  # Ray may refuse some
    finally:
        for client in stalled:
            client.close()


def test_a_request_line_of_an_unknown_http_version(server):
    """The default server refuses `HTTP/9.9` with a 400; Ray Serve's HAProxy ingress passes it on as
    HTTP/1.1, so --ray answers it (docs/serving.md says so; Ray offers no switch for it)."""
    process, _, port = server
    client = raw_request(port, b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        assert status_of(client) == (200 if "--ray" in process.process.args else 400)
    finally:
        client.close()


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="needs nvidia-pytriton")
def test_triton_answers_while_clients_stall_but_waits_for_a_body_past_any_limit(tiny_models, served_images,
                                                                                served_expected):
    port = free_port()
    started = ServerProcess([sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"), "--triton",
                             "--port", str(port), "--max-batch-size", "8"], ROOT, port)
    pixels = (served_images[0][:1].astype(np.float32) / 255).reshape(1, 1, 28, 28)
    body, headers = kserve.request_body(pixels)
    infer = "/v2/models/moe/infer"
    stalled = [raw_request(port, post_head(len(body), infer, headers), body[:10]) for _ in range(200)]
    huge = raw_request(port, post_head(10_000_000_000, infer, headers), body)
    try:
        time.sleep(0.5)
        for _ in range(5):
            began = time.perf_counter()
            request = urllib.request.Request(started.url + "v2/models/moe/infer", data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = kserve.read_answer(response.read(), response.headers.get(kserve.HEADER_LENGTH))
            assert time.perf_counter() - began < 1.0
            np.testing.assert_allclose(answer["logits"], served_expected[0][:1], atol=1e-5)
        huge.settimeout(3)
        with pytest.raises(socket.timeout):  # no 413 from the header: Triton waits for the 10 GB
            status_of(huge)
    finally:
        for client in (*stalled, huge):
            client.close()
        started.stop()


def test_the_first_content_length_and_type_count_and_a_length_that_is_no_number_is_none():
    from moebench.serving.asgi import length_and_type
    headers = [(b"host", b"x"), (b"content-length", b"784"), (b"content-type", b"application/json"),
               (b"content-length", b"5"), (b"content-type", b"text/plain")]
    assert length_and_type({"headers": headers}) == (784, "application/json")
    assert length_and_type({"headers": [(b"content-length", b"-1")]}) == (None, "")
    assert length_and_type({"headers": [(b"content-length", "７".encode())]}) == (None, "")
    assert length_and_type({"headers": []}) == (None, "")
