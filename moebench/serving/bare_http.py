"""The ceiling of this machine's HTTP path: a server with no model that reads each POST and answers
every image in it with a canned answer of the same shape and size as serve.py's (class, ten logits,
two experts, served_by), so the client parses as much as it does from a real server. Two of them:
aiohttp's server, and uvicorn with a plain ASGI handler (serve.py's own HTTP stack: httptools and
uvloop); and granian, a Rust HTTP server, with that same handler. loadgen.py measures them beside the
real servers, with the same client, so each server's QPS can be read as a share of the fastest.

Two more take serve.py's own work apart from its model (docs/serving.md, "Where a request's time
goes"): uvicorn-deferred writes each answer one event-loop pass after its request was read, as a
batching server does; serve-py-no-model is serve.py's own application with a model that takes no time.

    python -m moebench.serving.bare_http --port 8000 \
        --server aiohttp|uvicorn|granian|uvicorn-deferred|serve-py-no-model"""
import argparse
import asyncio

import numpy as np
import orjson

from .asgi import read_body, respond
from .batcher import ClientGone
from .http_app import GRANIAN_SETTINGS, UVICORN_SETTINGS, Application
from .requests import PIXELS_PER_IMAGE

CANNED = {"class": 7, "logits": [-3.91825, -6.77241, 1.76233, 4.24012, -8.09416, -3.54183, -17.44731, 13.63474,
                                 -3.33364, 1.99935],
          "experts": [{"expert": 3, "weight": 0.53419}, {"expert": 6, "weight": 0.46581}]}
SERVED_BY = {"server": "bare server, no model", "host": "bare", "pid": 0}


def canned(images):
    """The answer's bytes, encoded as serve.py encodes its own (orjson)."""
    return orjson.dumps({"predictions": [CANNED] * images, "served_by": SERVED_BY})


def app():
    from aiohttp import web

    async def answer(request):
        if request.method == "GET":
            return web.json_response({"server": "bare aiohttp, no model"})
        images = len(await request.read()) // PIXELS_PER_IMAGE
        return web.Response(body=canned(images), content_type="application/json")
    application = web.Application()
    application.router.add_route("*", "/", answer)
    return application


async def asgi(scope, receive, send):
    """The same canned answers as a plain ASGI application for uvicorn, reading bodies and writing
    answers with the default server's own functions."""
    if scope["type"] != "http":
        return
    try:
        body = await read_body(receive, float("inf"))
    except ClientGone:
        return
    await respond(send, 200, canned(len(body) // PIXELS_PER_IMAGE))


def deferred_asgi():
    """asgi() with every answer given one event-loop pass after its request was read, all the answers
    due in a pass at once, as a batching server gives them: what answering later costs by itself."""
    due = []

    def answer_all():
        answers, due[:] = list(due), []
        for future, images in answers:
            future.set_result(canned(images))

    async def deferred(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            body = await read_body(receive, float("inf"))
        except ClientGone:
            return
        loop = asyncio.get_running_loop()
        if not due:
            loop.call_soon(answer_all)
        due.append((loop.create_future(), len(body) // PIXELS_PER_IMAGE))
        await respond(send, 200, await due[-1][0])
    return deferred


class CannedEngine:
    """serve.py's engine where the model should cost nothing: the canned logits and gates for every
    image of the batches the worker computes itself."""
    backend, experts = "none", 8
    logits = np.array(CANNED["logits"], np.float32)
    gates = np.zeros(experts, np.float32)
    gates[[e["expert"] for e in CANNED["experts"]]] = [e["weight"] for e in CANNED["experts"]]

    def describe(self):
        return {"engine": "none: canned answers"}

    def compute(self, pixels):
        return np.tile(self.logits, (len(pixels), 1)), np.tile(self.gates, (len(pixels), 1))


class CannedModelProcess:
    """serve.py's model process where the model should cost nothing (ModelProcess's put, compute and
    in_flight): a batch handed over comes back one event-loop pass later with canned answers."""
    in_flight = 2
    row = (orjson.dumps(CANNED), CannedEngine.logits, CannedEngine.gates)

    @staticmethod
    def put(pieces):
        return sum(len(piece) for piece in pieces)

    def compute(self, images):
        future = asyncio.get_running_loop().create_future()
        future.get_loop().call_soon(future.set_result, [self.row] * images)
        return future


def serve_py_without_model():
    """serve.py's own application (request handling, batcher, hand-over) with a model that costs nothing."""
    settings = {"max_batch_size": 64, "batch_wait_ms": 0, "max_queued": 256, "max_request_images": 1024}
    return Application(CannedEngine(), settings, SERVED_BY, elsewhere=CannedModelProcess())


# --server: what it is, and its ASGI application for uvicorn (aiohttp's and granian's are their own)
SERVERS = {"aiohttp": ("aiohttp's server", None),
           "uvicorn": ("uvicorn with a plain ASGI handler (serve.py's HTTP stack)", lambda: asgi),
           "granian": ("granian, a Rust HTTP server, with the same plain ASGI handler", None),
           "uvicorn-deferred": ("the same, each answer written one event-loop pass after its request was read, as "
                                "a batching server writes them", deferred_asgi),
           "serve-py-no-model": ("serve.py's own application on uvicorn, its model answering at once with canned "
                                 "answers", serve_py_without_model)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=tuple(SERVERS), default="aiohttp",
                        help="; ".join(f"{name}: {what}" for name, (what, _) in SERVERS.items()))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(f"serving nothing at http://{args.host}:{args.port}/ with {args.server} (Ctrl-C stops)", flush=True)
    make_application = SERVERS[args.server][1]
    if args.server == "granian":
        from granian import Granian
        Granian("moebench.serving.bare_http:asgi", address=args.host, port=args.port, **GRANIAN_SETTINGS).serve()
    elif make_application:
        import uvicorn
        uvicorn.run(make_application(), host=args.host, port=args.port, **UVICORN_SETTINGS)
    else:
        from aiohttp import web
        web.run_app(app(), host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
