"""serve.py's default server, on one machine: uvicorn worker processes under uvicorn's supervisor
(a worker that dies is replaced), each with the model in process behind a dynamic batcher. A batch
of more than a few images runs on a model thread of its own, so the event loop keeps accepting,
parsing and refusing requests while it computes; a request's images never wait behind more than
one batch of another's. A batch of a few images runs on the event loop itself, since it takes less
time than handing it to a thread and back (docs/serving.md has the measurement). A Ray Serve
replica serves the same application (classifier()).

Hostile clients: a declared length past the limit is refused (413) before the body is read, a
body that does not arrive whole within `body_timeout_s` is refused (408) and frees its place, and
any body that cannot be parsed is a 4xx."""
import asyncio
import json
import os
import signal
import socket
import time

import orjson

from .. import gc_settings
from ..cli import require_module
from . import requests
from .batcher import Batcher, Full
from .engine import Engine

BODY_TIMEOUT_S = 10.0  # a request's body must arrive whole within this, or its place goes to others
CLOSE = [(b"connection", b"close")]
SETTINGS_ENV = "MOE_SERVE_SETTINGS"  # how the supervisor hands the settings to its worker processes
BIG_BODY = 64 * requests.PIXELS_PER_IMAGE  # bytes from which a body is parsed off the event loop
INLINE_IMAGES = 16  # batches up to this size run on the event loop: cheaper there than a thread handoff


def settings_from_environment():
    return json.loads(os.environ[SETTINGS_ENV])


def make_engine(settings):
    """A worker's engine; it runs where the repository is, so it may read the registry."""
    from ..runners.registry import servable
    served = servable()[settings["backend"]]
    model = b""
    if not served.from_checkpoint:
        with open(settings["model"], "rb") as f:
            model = f.read()
    return Engine(served, model, settings["threads"], settings["precision"], settings["checkpoint"])


async def respond(send, status, payload, headers=()):
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def declared_length(scope):
    """The Content-Length the client declared, or None (chunked, or no number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


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
    gc_settings.settle()
    return classify


def classifier(engine, settings, served_by):
    """The server's API as a plain ASGI application around `engine` and a Batcher (plain ASGI, since
    a framework's routing and request objects cost more per request than the model does)."""
    batcher = Batcher(engine.compute, settings["max_batch_images"], settings["batch_wait_ms"] / 1000,
                      settings["max_queued"], lambda found: requests.answers(*found), INLINE_IMAGES)
    about = orjson.dumps({"model": "MoE MNIST classifier", **served_by, **engine.describe(),
                          "batching": f"up to {settings['max_batch_images']} images per model call, "
                                      f"{settings['batch_wait_ms']:g} ms wait",
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    limit = settings["max_images"] * requests.PIXELS_PER_IMAGE * 8  # JSON spends up to ~8 bytes a pixel
    too_big = {"error": f"body over {limit} bytes; at most {settings['max_images']} images per request"}
    body_timeout_s = settings.get("body_timeout_s", BODY_TIMEOUT_S)

    async def classify(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] != "/":
            return await respond(send, 404, {"error": f"no {scope['path']} here; POST images to /"})
        if scope["method"] == "GET":
            return await respond(send, 200, about)
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served; POST images, or GET /"})
        declared = declared_length(scope)
        if declared is not None and declared > limit:  # refused from the header: its body is never awaited
            return await respond(send, 413, too_big, CLOSE)
        try:
            async with asyncio.timeout(body_timeout_s):  # a timer handle, no task per request as wait_for makes
                body = await read_body(receive, limit)
        except TimeoutError:
            return await respond(send, 408, {"error": f"the body did not arrive whole within {body_timeout_s:g} s"},
                                 CLOSE)
        if body is None:
            return await respond(send, 413, too_big, CLOSE)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        loop = asyncio.get_running_loop()
        parse = lambda: requests.parse(body, content_type, settings["max_images"])  # noqa: E731
        try:
            images = await loop.run_in_executor(None, parse) if len(body) > BIG_BODY else parse()
            answers = await batcher.classify(images)
        except requests.RequestError as error:
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
    config = uvicorn.Config("moebench.serving.http_app:app", factory=True, host=host, port=port, workers=workers,
                            lifespan="off", log_level="warning", access_log=False, backlog=4096,
                            timeout_keep_alive=30)
    sockets = [config.bind_socket()]
    Multiprocess(config, sockets=sockets).run()
