"""Dynamic batching for one server process: requests queue, each model call takes up to a set
number of images, a full queue refuses at once, and a big request never holds up small ones for
more than one call."""
import asyncio
import collections
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Full(Exception):
    """More requests are waiting than --max-queued allows: answered 503 at once."""


class ClientGone(Exception):
    """The request's client closed its connection before the request's images were computed: they
    are not computed, and nothing is answered."""
    STATUS = 499  # what the metrics count it as (nginx's name for it: client closed request)


class Waiting:
    """One request in the queue: its images, how far batches have taken them, its answers so far,
    when it arrived, and its client (None, or an object whose `disconnected` says it went away)."""
    __slots__ = ("images", "taken", "done", "answers", "future", "client", "arrived")

    def __init__(self, images, future, client=None):
        self.images, self.future, self.client = images, future, client
        self.arrived = time.perf_counter()
        self.taken = self.done = 0
        self.answers = [None] * len(images)

    @property
    def untaken(self):
        return len(self.images) - self.taken


class Batcher:
    """Dynamic batching: each model call takes up to `max_batch_size` images, first from the requests
    that arrived since the last call, then from requests with images left over (a big request's
    rest). So a request that arrives while the model computes is in the next call, whatever big
    request came before it; while leftovers wait, new arrivals fill at most 3/4 of a call, so a big
    request moves on even under a stream of small ones."""

    def __init__(self, compute, max_batch_size, wait_s, max_queued, finish=lambda computed: computed, inline_images=0,
                 join=np.concatenate, elsewhere=None, recorder=None):
        """compute(images) runs on the model thread and should hold no GIL for long (the engine call),
        or on the event loop for batches of up to `inline_images`; finish(computed) -> one answer per
        image runs on the event loop (cheap Python, per batch); join(pieces) makes the batch of the
        requests' images (once per batch, so that per-request work stays small).
        elsewhere: the same model in another process (a ModelProcess: put(pieces) -> batch,
        compute(batch) -> a future of the answers, in_flight): every batch goes there but one of up to
        `inline_images` while none is there (a lone small request is answered sooner here than by a
        round trip to another process), and up to `in_flight` batches are there at a time, so that
        the model does not wait for the event loop.
        recorder: where queue waits, abandoned requests and the model calls made here are counted
        (metrics.Recorder), or None."""
        self.recorder = recorder
        self.compute, self.finish, self.inline_images, self.join = compute, finish, inline_images, join
        self.elsewhere = elsewhere
        self.room = asyncio.Semaphore(elsewhere.in_flight) if elsewhere else None
        self.handed_over = 0  # batches elsewhere now
        self.max_batch_size, self.wait_s, self.max_queued = max_batch_size, wait_s, max_queued
        self.arrived, self.leftover = collections.deque(), collections.deque()
        self.waiting = 0
        self.busy = False  # the last batch found more than one request: worth waiting for company
        self.wake = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.worker = None

    async def infer(self, images, client=None):
        """The answers for `images`, one per image; ClientGone once `client` is gone before they are computed."""
        if self.waiting >= self.max_queued:
            raise Full(f"{self.waiting} requests are waiting already (--max-queued {self.max_queued}); try again")
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self.run())
        request = Waiting(images, asyncio.get_running_loop().create_future(), client)
        self.arrived.append(request)
        self.waiting += 1
        self.wake.set()
        try:
            return await request.future
        finally:
            self.waiting -= 1

    def stop(self):
        """End a retired batcher's task and thread (it holds no request any more)."""
        if self.worker is not None:
            self.worker.cancel()
        self.model_thread.shutdown(wait=False)

    def queued_images(self):
        return sum(r.untaken for line in (self.arrived, self.leftover) for r in line)

    def take(self):
        """[(request, start, end)] for the next call: arrivals first, leftovers after them."""
        pieces = []
        kept_for_leftovers = min(self.max_batch_size // 4, sum(r.untaken for r in self.leftover))
        room = self.draw(self.arrived, self.max_batch_size - kept_for_leftovers, pieces)
        self.draw(self.leftover, room + kept_for_leftovers, pieces)
        return pieces

    def draw(self, line, room, pieces):
        """Move up to `room` images from the head of `line` into pieces; returns the room left."""
        while line and room:
            request = line.popleft()
            if request.future.done():
                continue
            if request.client is not None and request.client.disconnected:
                self.abandon(request)
                continue
            if self.recorder is not None and not request.taken:
                self.recorder.queue_waits.append(time.perf_counter() - request.arrived)
            count = min(room, request.untaken)
            pieces.append((request, request.taken, request.taken + count))
            request.taken += count
            room -= count
            if request.untaken:
                self.leftover.append(request)
        return room

    async def run(self):
        while True:
            while not (self.arrived or self.leftover):
                self.wake.clear()
                await self.wake.wait()
            if self.room:
                await self.room.acquire()
            if self.busy and self.wait_s and self.queued_images() < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # under load, a moment for more requests to join this batch
            pieces = self.take()
            self.busy = len(pieces) > 1
            images = [request.images[start:end] for request, start, end in pieces]
            if pieces and self.elsewhere and (self.handed_over or sum(map(len, images)) > self.inline_images):
                self.hand_over(pieces, images)
                continue
            if pieces:
                await self.compute_here(pieces, self.join(images))
            if self.room:
                self.room.release()

    def abandon(self, request):
        request.future.set_exception(ClientGone())
        if self.recorder is not None:
            self.recorder.abandoned += 1

    async def compute_here(self, pieces, batch):
        started = time.perf_counter()
        try:
            if len(batch) <= self.inline_images:
                computed = self.compute(batch)
            else:
                computed = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.compute, batch)
            answers = self.finish(computed)
        except Exception as error:  # the model failed on this batch: its requests get a 500
            self.fail(pieces, error)
            return
        if self.recorder is not None:
            self.recorder.model_call(len(batch), time.perf_counter() - started)
        self.deliver(pieces, answers)

    def hand_over(self, pieces, images):
        try:
            future = self.elsewhere.compute(self.elsewhere.put(images))
        except Exception as error:  # the batch could not be handed over: its requests get a 500
            self.room.release()
            self.fail(pieces, error)
            return
        self.handed_over += 1
        future.add_done_callback(functools.partial(self.computed_elsewhere, pieces))

    def computed_elsewhere(self, pieces, future):
        self.handed_over -= 1
        self.room.release()
        if future.exception() is not None:
            self.fail(pieces, future.exception())
        else:
            self.deliver(pieces, future.result())

    @staticmethod
    def fail(pieces, error):
        for request, _, _ in pieces:
            if not request.future.done():
                request.future.set_exception(error)

    @staticmethod
    def deliver(pieces, answers):
        at = 0
        for request, start, end in pieces:
            request.answers[start:end] = answers[at:at + end - start]
            at += end - start
            request.done += end - start
            if request.done == len(request.images) and not request.future.done():
                request.future.set_result(request.answers)
