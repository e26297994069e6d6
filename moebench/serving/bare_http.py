"""The ceiling of this machine's HTTP path: a server with no model that reads each POST and answers
every image in it with a canned answer of the same shape and size as serve.py's (class, ten logits,
two experts, served_by), so the client parses as much as it does from a real server. Two of them:
aiohttp's server, and uvicorn with a plain ASGI handler (serve.py's own HTTP stack: httptools and
uvloop). loadgen.py measures both beside the real servers, with the same client, so each server's QPS
can be read as a share of the faster one.

    python -m moebench.serving.bare_http --server aiohttp|uvicorn --port 8000"""
import argparse

import orjson

from .http_app import UVICORN_SETTINGS, read_body, respond
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
    body = await read_body(receive, float("inf"))
    await respond(send, 200, canned(len(body) // PIXELS_PER_IMAGE))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=("aiohttp", "uvicorn"), default="aiohttp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(f"serving nothing at http://{args.host}:{args.port}/ with {args.server} (Ctrl-C stops)", flush=True)
    if args.server == "uvicorn":
        import uvicorn
        uvicorn.run(asgi, host=args.host, port=args.port, **UVICORN_SETTINGS)
    else:
        from aiohttp import web
        web.run_app(app(), host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
