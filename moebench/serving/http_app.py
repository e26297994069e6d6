"""serve.py's default server, on one machine: uvicorn worker processes under uvicorn's supervisor
(a worker that dies is replaced), each with a dynamic batcher and a model process of its own
(model_process.py) that computes the batches off the worker's event loop and GIL; a lone batch of
one or two images runs on the event loop, since a round trip to another process takes longer. A
request's images never wait behind more than one batch of another's. The application answers its
own API at / and the Open Inference Protocol (KServe v2, kserve.py) under /v2. A Ray Serve replica
serves the same application (Application) with the model in its own process: a batch of more than
a few images on a model thread, a few on the event loop (cheaper than a thread handoff; docs/serving.md
has the measurements).

Hostile clients: a declared length past the limit is refused (413) before the body is read, a
body that does not arrive whole within `body_timeout_s` is refused (408) and frees its place, and
any body that cannot be parsed is a 4xx."""
import asyncio
import json
import os
import socket
import time

import numpy as np
import orjson

from .. import gc_settings
from ..cli import require_module
from . import kserve, requests
from .batcher import Batcher, Full
from .engine import engine_of
from .model_process import ModelProcess
from .server_process import end_with_parent

BODY_TIMEOUT_S = 10.0  # a request's body must arrive whole within this, or its place goes to others
CLOSE = [(b"connection", b"close")]
# no proxy headers (nothing here reads the client's address), no Server and Date headers: each is work
# per request that the answers do not need; the bare uvicorn server runs with the same settings
UVICORN_SETTINGS = {"lifespan": "off", "log_level": "warning", "access_log": False, "backlog": 4096,
                    "timeout_keep_alive": 30, "proxy_headers": False, "server_header": False, "date_header": False}
SETTINGS_ENV = "MOE_SERVE_SETTINGS"  # how the supervisor hands the settings to its worker processes
BIG_BODY = 64 * requests.PIXELS_PER_IMAGE  # bytes from which a body is parsed off the event loop
INLINE_IMAGES = 16  # batches up to this size run on the event loop: cheaper there than a thread handoff
LONE_IMAGES = 2  # with a model process: a batch up to this size, while none is there, runs on the event loop


def settings_from_environment():
    return json.loads(os.environ[SETTINGS_ENV])


async def respond(send, status, payload, headers=(), content_type=b"application/json"):
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def length_and_type(scope):
    """The Content-Length the client declared (None: chunked, or no number) and the Content-Type, in
    one pass over the headers."""
    length = content_type = None
    for key, value in scope["headers"]:
        if key == b"content-length" and length is None:
            length = value
        elif key == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
    return int(length) if length and length.isdigit() else None, content_type or ""


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


class Deadlines:
    """Bodies that must arrive within `timeout_s`: one sweep a fraction of the timeout cancels the
    requests still reading past it. A dict entry per request is cheaper on the event loop than a timer
    per request (asyncio.timeout; docs/serving.md has both measured)."""

    def __init__(self, timeout_s, sweeps_per_timeout=10):
        self.timeout_s, self.every_s = timeout_s, timeout_s / sweeps_per_timeout
        self.reading, self.cut = {}, set()
        self.sweeper = None

    def watch(self, loop):
        """Watch the request that `loop` runs now; returns its task."""
        if self.sweeper is None:
            self.sweeper = loop.create_task(self.sweep())
        task = asyncio.current_task(loop)
        self.reading[task] = loop.time() + self.timeout_s
        return task

    def forget(self, task):
        self.reading.pop(task, None)
        self.cut.discard(task)

    def expired(self, task):
        """Whether `task` was cancelled for its deadline (then it may go on to answer 408)."""
        if task not in self.cut:
            return False
        task.uncancel()
        return True

    async def sweep(self):
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.every_s)
            now = loop.time()
            for task in [task for task, deadline in self.reading.items() if deadline <= now]:
                del self.reading[task]
                self.cut.add(task)
                task.cancel()


def app():
    """The ASGI application of one worker process (uvicorn's factory)."""
    end_with_parent()
    settings = settings_from_environment()
    model_process = ModelProcess(settings, SETTINGS_ENV)  # starts while this process makes its own engine
    engine = engine_of(settings)
    model_process.wait_until_ready()
    application = Application(engine, settings, {"server": "uvicorn", "backend": engine.backend,
                                                 "host": socket.gethostname(), "pid": os.getpid()}, model_process)
    gc_settings.settle()
    return application


class Application:
    """The server's API as a plain ASGI application around `engine` and a Batcher (plain ASGI, since
    a framework's routing and request objects cost more per request than the model does): its own
    API at / (own_api) and the Open Inference Protocol under /v2 (open_inference, v2_infer).
    elsewhere: the same model in a process of its own (ModelProcess), which computes every batch but
    a lone small one. A request carries at most settings['max_request_images'] images; a model call
    takes at most settings['max_batch_size']."""

    def __init__(self, engine, settings, served_by, elsewhere=None):
        self.batcher = Batcher(engine.compute, settings["max_batch_size"], settings["batch_wait_ms"] / 1000,
                               settings["max_queued"], with_rows, LONE_IMAGES if elsewhere else INLINE_IMAGES,
                               requests.joined_pixels, elsewhere)
        self.answers_end = b'],"served_by":' + orjson.dumps(served_by) + b"}"
        described = engine.describe()
        self.about = orjson.dumps({"model": "MoE MNIST classifier", **served_by, **described,
                                   "batching": f"up to {settings['max_batch_size']} images per model call, "
                                               f"{settings['batch_wait_ms']:g} ms wait",
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.v2_documents = {"server": kserve.server_metadata(described.get("engine", engine.backend)),
                             "model": kserve.model_metadata(engine.backend, engine.experts), "live": b"",
                             "ready": b"", "model-ready": b""}
        self.max_request_images = settings["max_request_images"]
        self.limit = self.max_request_images * requests.PIXELS_PER_IMAGE * 8  # JSON spends up to ~8 bytes a pixel
        self.too_big = {"error": f"body over {self.limit} bytes; at most {self.max_request_images} images per request"}
        self.body_timeout_s = settings.get("body_timeout_s", BODY_TIMEOUT_S)
        self.deadlines = Deadlines(self.body_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        asked = kserve.route(path) if path.startswith("/v2") else None
        if path != "/" and asked is None:
            return await respond(send, 404, {"error": f"no {path} here; POST images to /, or use the Open Inference "
                                                      f"Protocol under /v2/models/{kserve.MODEL}"})
        try:
            if asked is None:
                await self.own_api(scope, receive, send)
            elif asked == "infer":
                await self.v2_infer(scope, receive, send)
            else:
                await self.open_inference(scope, send, asked)
        except requests.RequestError as error:
            await respond(send, error.status, {"error": str(error)})
        except Full as error:
            await respond(send, 503, {"error": str(error)}, [(b"retry-after", b"1")])

    async def own_api(self, scope, receive, send):
        """GET / says what is served; POST / classifies raw or JSON images."""
        if scope["method"] == "GET":
            return await respond(send, 200, self.about)
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served; POST images, or GET /"})
        declared, content_type = length_and_type(scope)
        body = await self.body_of(declared, receive, send)
        if body is None:
            return
        rows = await self.batcher.infer(await parsed(requests.parse, body, content_type, self.max_request_images))
        await respond(send, 200, b'{"predictions":[' + b",".join([row[0] for row in rows]) + self.answers_end)

    async def open_inference(self, scope, send, asked):
        """The Open Inference Protocol's health and metadata documents."""
        if scope["method"] != "GET":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at {scope['path']}; GET it"})
        return await respond(send, 200, self.v2_documents[asked])

    async def v2_infer(self, scope, receive, send):
        """POST /v2/models/moe/infer: JSON tensors or the binary tensor extension."""
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at {scope['path']}; POST"})
        body = await self.body_of(length_and_type(scope)[0], receive, send)
        if body is None:
            return
        length = header(scope, kserve.HEADER_LENGTH.encode()) or None
        pixels, request_id, wanted = await parsed(kserve.parse_infer, body, length, self.max_request_images)
        rows = await self.batcher.infer(pixels)
        answer, header_length = kserve.encode_infer(np.stack([row[1] for row in rows]),
                                                    np.stack([row[2] for row in rows]), request_id, wanted)
        extra = [] if header_length is None else [(kserve.HEADER_LENGTH.encode(), str(header_length).encode())]
        await respond(send, 200, answer, extra, b"application/octet-stream" if extra else b"application/json")

    async def body_of(self, declared, receive, send):
        """The request's body, or None once a 413 or 408 has answered it."""
        if declared is not None and declared > self.limit:  # refused from the header: its body is never awaited
            return await respond(send, 413, self.too_big, CLOSE)
        task = self.deadlines.watch(asyncio.get_running_loop())
        try:
            body = await read_body(receive, self.limit)
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise
            return await respond(send, 408, {"error": f"the body did not arrive whole within "
                                                      f"{self.body_timeout_s:g} s"}, CLOSE)
        finally:
            self.deadlines.forget(task)
        if body is None:
            return await respond(send, 413, self.too_big, CLOSE)
        return body


async def parsed(parse, body, *args):
    """parse(body, *args), off the event loop when the body is big."""
    if len(body) <= BIG_BODY:
        return parse(body, *args)
    return await asyncio.get_running_loop().run_in_executor(None, parse, body, *args)


def with_rows(computed):
    """Per image of a batch: (its answer in the server's own API as JSON, its logits row, its gates
    row), as a model process gives them."""
    logits, gates = computed
    return list(zip(requests.answers_json(logits, gates), logits, gates))


def header(scope, name):
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def serve(settings, host, port, workers):
    """Run the supervisor and its workers until Ctrl-C or SIGTERM (blocks)."""
    require_module("uvicorn", "serve.py")
    import uvicorn
    from uvicorn.supervisors import Multiprocess
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    config = uvicorn.Config("moebench.serving.http_app:app", factory=True, host=host, port=port, workers=workers,
                            **UVICORN_SETTINGS)
    sockets = [config.bind_socket()]
    Multiprocess(config, sockets=sockets).run()
