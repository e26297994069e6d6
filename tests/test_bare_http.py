"""The bare servers that loadgen.py and docs/serving.md measure serve.py against: their answers are
serve.py's in shape, and the deferred one writes a pass's answers only after it has read all of that
pass's requests, as a batching server does."""
import asyncio

import numpy as np
import orjson
import pytest

from moebench.serving import bare_http


def run_requests(app, images_per_request):
    """Run one ASGI request per entry at once; returns (events in order, {request: answer body})."""
    events, answers = [], {}

    async def one(index, images):
        async def receive():
            events.append(("read", index))
            return {"type": "http.request", "body": bytes(784 * images), "more_body": False}

        async def send(message):
            if message["type"] == "http.response.body":
                events.append(("write", index))
                answers[index] = message["body"]
            else:
                assert message["status"] == 200
        await app({"type": "http", "method": "POST", "path": "/", "headers": []}, receive, send)

    async def all_of_them():
        await asyncio.gather(*[one(index, images) for index, images in enumerate(images_per_request)])
    asyncio.run(all_of_them())
    return events, answers


def test_the_bare_answers_have_one_prediction_per_image_like_serve_py():
    _, answers = run_requests(bare_http.asgi, [1, 3])
    for index, images in enumerate([1, 3]):
        document = orjson.loads(answers[index])
        assert len(document["predictions"]) == images
        assert set(document["predictions"][0]) == {"class", "logits", "experts"}
        assert len(document["predictions"][0]["logits"]) == 10 and document["served_by"]["pid"] == 0


def test_the_deferred_server_reads_the_whole_pass_before_it_writes_the_same_answers():
    sizes = [1, 2, 3]
    plain_events, plain = run_requests(bare_http.asgi, sizes)
    deferred_events, deferred = run_requests(bare_http.deferred_asgi(), sizes)
    assert deferred == plain
    assert plain_events[:2] == [("read", 0), ("write", 0)]  # answered in the pass that read it
    assert [kind for kind, _ in deferred_events] == ["read"] * 3 + ["write"] * 3


def test_serve_py_without_a_model_answers_every_image_with_the_canned_answer():
    """serve.py's own application around a model that takes no time: a lone request computed by the
    worker's engine (its logits and gates through serve.py's own answer encoding) and batches 'handed
    over' to the canned model process (its prepared answer) give the same answer, the one those
    logits and gates mean."""
    _, answers = run_requests(bare_http.serve_py_without_model(), [1] + [2] * 5 + [1])
    assert sorted(answers) == list(range(7))
    documents = {index: orjson.loads(body) for index, body in answers.items()}
    assert [len(documents[i]["predictions"]) for i in range(7)] == [1] + [2] * 5 + [1]
    computed_here = documents[0]["predictions"][0]
    assert all(p == computed_here for d in documents.values() for p in d["predictions"])
    engine = bare_http.CannedEngine()
    logits, gates = engine.compute(np.zeros((1, 1, 28, 28), np.float32))
    assert computed_here["class"] == int(logits[0].argmax())
    np.testing.assert_allclose(computed_here["logits"], logits[0], atol=1e-5)
    assert {e["expert"]: e["weight"] for e in computed_here["experts"]} == pytest.approx(
        {int(i): float(gates[0][i]) for i in np.flatnonzero(gates[0])}, abs=1e-5)
