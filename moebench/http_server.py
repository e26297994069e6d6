"""serve.py's default server, on one machine: uvicorn worker processes under uvicorn's supervisor
(a worker that dies is replaced), each with the model in process behind a dynamic batcher. A batch
of more than a few images runs on a model thread of its own, so the event loop keeps accepting,
parsing and refusing requests while it computes; a request's images never wait behind more than
one batch of another's. A batch of a few images runs on the event loop itself: it takes tens of
microseconds, less than handing it to a thread and back (measured: 25% more single-image QPS)."""
import asyncio
import collections
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from . import collector, serving
from .cli import require_module
from .runners.served import FROM_CHECKPOINT

SETTINGS_ENV = "MOE_SERVE_SETTINGS"  # how the supervisor hands the settings to its worker processes
BIG_BODY = 64 * serving.PIXELS_PER_IMAGE  # bytes from which a body is parsed off the event loop
INLINE_IMAGES = 16  # batches up to this size run on the event loop (ONNX Runtime: ~80 us for 16 images)


class Full(Exception):
    """More requests are waiting than --max-queued allows: answered 503 at once."""


class Waiting:
    """One request in the queue: its images, how far batches have taken them, its answers so far."""
    __slots__ = ("images", "taken", "done", "answers", "future")

    def __init__(self, images, future):
        self.images, self.future = images, future
        self.taken = self.done = 0
        self.answers = [None] * len(images)

    @property
    def untaken(self):
        return len(self.images) - self.taken


class Batcher:
    """Dynamic batching: each model call takes up to `max_images` images, first from the requests
    that arrived since the last call, then from requests with images left over (a big request's
    rest). So a request that arrives while the model computes is in the next call, whatever big
    request came before it; while leftovers wait, new arrivals fill at most 3/4 of a call, so a big
    request moves on even under a stream of small ones."""

    def __init__(self, compute, max_images, wait_s, max_queued, finish=lambda computed: computed, inline_images=0):
        """compute(images) runs on the model thread and should hold no GIL for long (the engine call),
        or on the event loop for batches of up to `inline_images`; finish(computed) -> one answer per
        image runs on the event loop (cheap Python, per batch)."""
        self.compute, self.finish, self.inline_images = compute, finish, inline_images
        self.max_images, self.wait_s, self.max_queued = max_images, wait_s, max_queued
        self.arrived, self.leftover = collections.deque(), collections.deque()
        self.waiting = 0
        self.busy = False  # the last batch found more than one request: worth waiting for company
        self.wake = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.worker = None

    async def classify(self, images):
        if self.waiting >= self.max_queued:
            raise Full(f"{self.waiting} requests are waiting already (--max-queued {self.max_queued}); try again")
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self.run())
        request = Waiting(images, asyncio.get_running_loop().create_future())
        self.arrived.append(request)
        self.waiting += 1
        self.wake.set()
        try:
            return await request.future
        finally:
            self.waiting -= 1

    def queued_images(self):
        return sum(r.untaken for line in (self.arrived, self.leftover) for r in line)

    def take(self):
        """[(request, start, end)] for the next call: arrivals first, leftovers after them."""
        pieces = []
        kept_for_leftovers = min(self.max_images // 4, sum(r.untaken for r in self.leftover))
        room = self.draw(self.arrived, self.max_images - kept_for_leftovers, pieces)
        self.draw(self.leftover, room + kept_for_leftovers, pieces)
        return pieces

    def draw(self, line, room, pieces):
        """Move up to `room` images from the head of `line` into pieces; returns the room left."""
        while line and room:
            request = line.popleft()
            if request.future.done():  # its client went away
                continue
            count = min(room, request.untaken)
            pieces.append((request, request.taken, request.taken + count))
            request.taken += count
            room -= count
            if request.untaken:
                self.leftover.append(request)
        return room

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            while not (self.arrived or self.leftover):
                self.wake.clear()
                await self.wake.wait()
            if self.busy and self.wait_s and self.queued_images() < self.max_images:
                await asyncio.sleep(self.wait_s)  # under load, a moment for more requests to join this batch
            pieces = self.take()
            self.busy = len(pieces) > 1
            if not pieces:
                continue
            batch = np.concatenate([request.images[start:end] for request, start, end in pieces])
            try:
                if len(batch) <= self.inline_images:
                    computed = self.compute(batch)
                else:
                    computed = await loop.run_in_executor(self.model_thread, self.compute, batch)
                answers = self.finish(computed)
            except Exception as error:  # the model failed on this batch: its requests get a 500
                for request, _, _ in pieces:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            at = 0
            for request, start, end in pieces:
                request.answers[start:end] = answers[at:at + end - start]
                at += end - start
                request.done += end - start
                if request.done == len(request.images) and not request.future.done():
                    request.future.set_result(request.answers)


def batching_settings(args):
    """What classifier() takes from serve.py's flags, for a worker here or a Ray Serve replica."""
    return {"max_batch_images": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
            "max_queued": args.max_queued, "max_images": args.max_images}


def settings_from_environment():
    return json.loads(os.environ[SETTINGS_ENV])


def make_engine(settings):
    model = b""
    if settings["backend"] not in FROM_CHECKPOINT:
        with open(settings["model"], "rb") as f:
            model = f.read()
    return serving.Engine(model, settings["backend"], settings["threads"], settings["precision"],
                          settings["checkpoint"])


async def respond(send, status, payload, headers=()):
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive, limit):
    """The request body, or None once it grows past `limit` bytes (the rest is not read)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return b"".join(chunks)


def end_with_the_supervisor():
    """Ask Linux to end this worker when its supervisor dies: a supervisor killed with SIGKILL has no
    time to stop its workers, which would keep the port and the cores."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown is all there is
        pass


def app():
    """The ASGI application of one worker process (uvicorn's factory)."""
    end_with_the_supervisor()
    settings = settings_from_environment()
    engine = make_engine(settings)
    classify = classifier(engine, settings, {"server": "uvicorn", "backend": engine.backend,
                                             "host": socket.gethostname(), "pid": os.getpid()})
    collector.settle()
    return classify


def classifier(engine, settings, served_by):
    """The server's API as a plain ASGI application around `engine` and a Batcher (plain ASGI, since
    a framework's routing and request objects cost more per request than the model does)."""
    batcher = Batcher(engine.compute, settings["max_batch_images"], settings["batch_wait_ms"] / 1000,
                      settings["max_queued"], lambda found: serving.answers(*found), INLINE_IMAGES)
    about = orjson.dumps({"model": "MoE MNIST classifier", **served_by, **engine.describe(),
                          "batching": f"up to {settings['max_batch_images']} images per model call, "
                                      f"{settings['batch_wait_ms']:g} ms wait",
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    limit = settings["max_images"] * serving.PIXELS_PER_IMAGE * 8  # JSON spends up to ~8 bytes a pixel

    async def classify(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] != "/":
            return await respond(send, 404, {"error": f"no {scope['path']} here; POST images to /"})
        if scope["method"] == "GET":
            return await respond(send, 200, about)
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served; POST images, or GET /"})
        body = await read_body(receive, limit)
        if body is None:
            return await respond(send, 413, {"error": f"body over {limit} bytes; at most {settings['max_images']} "
                                                      "images per request"})
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        loop = asyncio.get_running_loop()
        parse = lambda: serving.parse(body, content_type, settings["max_images"])  # noqa: E731
        try:
            images = await loop.run_in_executor(None, parse) if len(body) > BIG_BODY else parse()
            answers = await batcher.classify(images)
        except serving.RequestError as error:
            return await respond(send, error.status, {"error": str(error)})
        except Full as error:
            return await respond(send, 503, {"error": str(error)}, [(b"retry-after", b"1")])
        await respond(send, 200, {"predictions": answers, "served_by": served_by})

    return classify


def serve(settings, host, port, workers):
    """Run the supervisor and its workers until Ctrl-C or SIGTERM (blocks)."""
    require_module("uvicorn", "serve.py")
    import uvicorn
    from uvicorn.supervisors import Multiprocess
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    config = uvicorn.Config("moebench.http_server:app", factory=True, host=host, port=port, workers=workers,
                            lifespan="off", log_level="warning", access_log=False, backlog=4096,
                            timeout_keep_alive=30)
    sockets = [config.bind_socket()]
    Multiprocess(config, sockets=sockets).run()
