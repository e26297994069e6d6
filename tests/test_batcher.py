"""The embedded server's dynamic batcher, on its own: batches stay within their size, a big request
shares the model with small ones batch by batch, every request gets its own answers, the event loop
keeps working (and refusing) while the model computes a batch bigger than the few images it computes
itself, and a failing batch fails only its requests."""
import asyncio
import threading

import numpy as np
import pytest

from moebench.serving.batcher import Batcher, Full


def request_images(marker, count):
    """`count` images whose pixels all hold `marker`, so an answer tells whose image it was."""
    return np.full((count, 784), marker, dtype=np.uint8)


class RecordingModel:
    """Answers each image with its marker, and records each batch's markers."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        markers = batch[:, 0].tolist()
        self.batches.append(markers)
        return markers


def test_a_big_request_waits_its_turn_and_small_ones_are_answered_in_the_next_batch():
    model = RecordingModel()

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0, max_queued=100)
        big = asyncio.ensure_future(batcher.infer(request_images(1, 100)))
        small = [asyncio.ensure_future(batcher.infer(request_images(marker, 1))) for marker in (2, 3, 4)]
        return await asyncio.gather(big, *small)
    answers = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert answers[0] == [1] * 100 and answers[1:] == [[2], [3], [4]]
    assert all(len(batch) <= 8 for batch in model.batches)
    assert sum(len(batch) for batch in model.batches) == 103
    first_with_small = next(i for i, batch in enumerate(model.batches) if set(batch) & {2, 3, 4})
    assert first_with_small == 1 and {2, 3, 4} <= set(model.batches[1])  # behind one batch of the big one, no more


def test_a_small_request_arriving_during_a_big_ones_batch_is_in_the_next_call():
    entered, release, batches = threading.Event(), threading.Event(), []

    def model(batch):
        batches.append(batch[:, 0].tolist())
        entered.set()
        release.wait(20)  # the first call holds the model until the small request has arrived
        return batch[:, 0].tolist()

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0, max_queued=100)
        big = asyncio.ensure_future(batcher.infer(request_images(1, 40)))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        small = asyncio.ensure_future(batcher.infer(request_images(2, 1)))
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(big, small)
    answers = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert answers == [[1] * 40, [2]]
    assert batches[0] == [1] * 8 and 2 in batches[1]  # behind the call in flight, and no other


def test_a_big_request_moves_on_under_a_stream_of_small_ones():
    model = RecordingModel()

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0, max_queued=1000)
        big = asyncio.ensure_future(batcher.infer(request_images(1, 24)))
        small = [asyncio.ensure_future(batcher.infer(request_images(2, 1))) for _ in range(80)]
        await asyncio.gather(big, *small)
        return big.result()
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [1] * 24
    finished = max(i for i, batch in enumerate(model.batches) if 1 in batch)
    assert finished <= 8, model.batches  # 2 of every 8 images kept for it: not after all 80 small ones (12)


def test_the_event_loop_answers_and_refuses_while_the_model_computes():
    release = threading.Event()

    def slow_model(batch):
        release.wait(20)  # the model thread is busy until the event loop says so
        return batch[:, 0].tolist()

    async def scenario():
        batcher = Batcher(slow_model, max_batch_size=64, wait_s=0, max_queued=1, inline_images=2)
        first = asyncio.ensure_future(batcher.infer(request_images(7, 3)))  # more than inline_images
        await asyncio.sleep(0.1)  # runs only if the model call left the loop free
        with pytest.raises(Full, match="--max-queued 1"):
            await batcher.infer(request_images(8, 1))
        release.set()
        return await first
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [7, 7, 7]


def test_a_failing_batch_fails_its_requests_and_the_next_ones_are_served():
    calls = []

    def flaky_model(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the engine failed")
        return batch[:, 0].tolist()

    async def scenario():
        batcher = Batcher(flaky_model, max_batch_size=64, wait_s=0, max_queued=10)
        with pytest.raises(RuntimeError, match="the engine failed"):
            await batcher.infer(request_images(5, 2))
        return await batcher.infer(request_images(6, 2))
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [6, 6]


def test_only_batches_of_a_few_images_run_on_the_event_loop():
    threads = {}

    def model(batch):
        threads[len(batch)] = threading.get_ident()
        return batch[:, 0].tolist()

    async def scenario():
        batcher = Batcher(model, max_batch_size=64, wait_s=0, max_queued=10, inline_images=4)
        for count in (1, 4, 5, 64):
            assert await batcher.infer(request_images(count, count)) == [count] * count
        return threading.get_ident()
    loop_thread = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert threads[1] == threads[4] == loop_thread
    assert threads[5] == threads[64] != loop_thread


class ModelElsewhere:
    """Stands for a model process: put() records a batch, compute() hands back a future that the test
    completes, so it sees what is handed over while batches are out."""
    in_flight = 2

    def __init__(self):
        self.handed, self.out = [], []

    def put(self, pieces):
        return np.concatenate(pieces)

    def compute(self, batch):
        future = asyncio.get_running_loop().create_future()
        self.handed.append(batch[:, 0].tolist())
        self.out.append((future, batch))
        return future

    def answer(self, failure=None):
        future, batch = self.out.pop(0)
        future.set_exception(failure) if failure else future.set_result(batch[:, 0].tolist())


def test_a_model_elsewhere_gets_every_batch_but_a_lone_small_one_and_two_at_most():
    here, elsewhere = RecordingModel(), ModelElsewhere()

    async def scenario():
        batcher = Batcher(here, max_batch_size=8, wait_s=0, max_queued=100, inline_images=2, elsewhere=elsewhere)
        assert await batcher.infer(request_images(1, 2)) == [1, 1]  # alone and small: computed here
        big = [asyncio.ensure_future(batcher.infer(request_images(marker, 3))) for marker in (2, 3, 4, 5)]
        await asyncio.sleep(0.05)
        handed_while_out = list(elsewhere.handed)  # nothing came back yet: two batches at most
        small = asyncio.ensure_future(batcher.infer(request_images(6, 1)))
        await asyncio.sleep(0.05)
        elsewhere.answer(RuntimeError("the model process failed"))
        await asyncio.sleep(0.05)
        while elsewhere.out:
            elsewhere.answer()
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*big, small, return_exceptions=True)
        return handed_while_out, results
    handed_while_out, results = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert here.batches == [[1, 1]]
    assert handed_while_out == [[2, 2, 2, 3, 3, 3, 4, 4], [5, 5, 5, 4]]  # two out, the small one waits
    assert all(isinstance(result, RuntimeError) for result in results[:3])  # the failed batch's requests
    assert results[3:] == [[5, 5, 5], [6]]
    assert elsewhere.handed[2] == [6]  # small, but handed over too, since a batch was out


def test_a_batch_that_cannot_be_handed_over_fails_its_requests_and_the_next_ones_are_served():
    class RefusesOnce(ModelElsewhere):
        refused = False

        def put(self, pieces):
            if not self.refused:
                self.refused = True
                raise ValueError("no room in the shared memory")
            return super().put(pieces)
    elsewhere = RefusesOnce()

    async def scenario():
        batcher = Batcher(RecordingModel(), max_batch_size=8, wait_s=0, max_queued=10, inline_images=2,
                          elsewhere=elsewhere)
        with pytest.raises(ValueError, match="no room"):
            await batcher.infer(request_images(3, 3))
        second = asyncio.ensure_future(batcher.infer(request_images(4, 3)))
        await asyncio.sleep(0.05)
        elsewhere.answer()
        return await second
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [4, 4, 4]
