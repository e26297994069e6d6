"""Hostile clients against both servers (the default and --ray): a declared length past the limit is
refused from the header, and clients that stall mid-body cannot take the service away."""
import time

from conftest import BODY_TIMEOUT_S, check_answers, post
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


def test_the_first_content_length_and_type_count_and_a_length_that_is_no_number_is_none():
    from moebench.serving.asgi import length_and_type
    headers = [(b"host", b"x"), (b"content-length", b"784"), (b"content-type", b"application/json"),
               (b"content-length", b"5"), (b"content-type", b"text/plain")]
    assert length_and_type({"headers": headers}) == (784, "application/json")
    assert length_and_type({"headers": [(b"content-length", b"-1")]}) == (None, "")
    assert length_and_type({"headers": [(b"content-length", "７".encode())]}) == (None, "")
    assert length_and_type({"headers": []}) == (None, "")
