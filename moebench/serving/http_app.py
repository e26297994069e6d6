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
import itertools
import json
import os
import socket
import sys
import time

import numpy as np
import orjson

from .. import gc_settings
from ..cli import UserError, require_module
from . import kserve, metrics, repository, requests
from .asgi import CLOSE, Deadlines, header, length_and_type, read_body, respond
from .batcher import Batcher, ClientGone, Full
from .engine import engine_of
from .model_process import ModelProcess
from .server_process import end_with_parent
from .swap import UNLOADED, Swapper, Unloaded

BODY_TIMEOUT_S = 10.0  # a request's body must arrive whole within this, or its place goes to others
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


def app():
    """The ASGI application of one worker process (uvicorn's factory). It serves what the server's last
    load order says (repository.py), or the settings' model where none was given yet."""
    end_with_parent()
    settings = settings_from_environment()
    order = repository.Orders(settings["orders"]).read()
    serving = starting_settings(settings, order)
    model_process = ModelProcess(serving, SETTINGS_ENV)  # starts while this process makes its own engine
    engine = engine_of(serving)
    model_process.wait_until_ready()
    served_by = {"server": settings.get("http_server", "uvicorn"), "backend": engine.backend,
                 "host": socket.gethostname(), "pid": os.getpid()}
    application = Application(engine, settings, served_by, model_process,
                              metrics.Recorder() if metrics.enabled() else None,
                              repository.describe(repository.served_path(serving)))
    application.swapper = Swapper(application, settings, SETTINGS_ENV, order["generation"] if order else 0)
    if order and not order["model"]:
        application.install(None, None, None)
        model_process.close()
    try:
        application.start_serving()
    except RuntimeError:  # no event loop runs yet (granian makes the application before its loop): first request
        pass
    gc_settings.settle()
    return application


def starting_settings(settings, order):
    """The settings with the model the last order names, where it can still be served; else the
    settings' own (a worker that cannot start would be replaced, and fail again, forever)."""
    if not order or not order["model"]:
        return settings
    try:
        return repository.serving(settings, order["model"])
    except Exception as error:
        print(f"worker {os.getpid()}: {order['model']} of the last load cannot be served ({error}); serving "
              f"{repository.served_path(settings)}", file=sys.stderr, flush=True)
        return settings


class Application:
    """The server's API as a plain ASGI application around `engine` and a Batcher (plain ASGI, since
    a framework's routing and request objects cost more per request than the model does): its own
    API at / (own_api) and the Open Inference Protocol under /v2 (open_inference, v2_infer).
    elsewhere: the same model in a process of its own (ModelProcess), which computes every batch but
    a lone small one. A request carries at most settings['max_request_images'] images; a model call
    takes at most settings['max_batch_size']."""

    def __init__(self, engine, settings, served_by, elsewhere=None, recorder=None, served=None):
        self.settings, self.served_by, self.recorder = settings, served_by, recorder
        self.batcher = self.elsewhere = None
        self.install(engine, elsewhere, served)
        if recorder:
            recorder.waiting = lambda: self.batcher.waiting
        self.answers_end = b'],"served_by":' + orjson.dumps(served_by) + b"}"
        self.max_request_images = settings["max_request_images"]
        self.limit = self.max_request_images * requests.PIXELS_PER_IMAGE * 8  # JSON spends up to ~8 bytes a pixel
        self.too_big = {"error": f"body over {self.limit} bytes; at most {self.max_request_images} images per request"}
        self.body_timeout_s = settings.get("body_timeout_s", BODY_TIMEOUT_S)
        self.deadlines = Deadlines(self.body_timeout_s)
        self.swapper = None  # a worker of serve.py's own server loads and unloads models (swap.Swapper)
        self.housekeeper = None

    def install(self, engine, elsewhere, served):
        """Serve `engine` (None: no model; requests get a 503) with `elsewhere`, its model process, from
        here on; `served`: what GET /v2/models/moe says of its file (repository.describe), or None.
        Returns the (batcher, model process) it replaces, which answer what they hold."""
        replaced = self.batcher, self.elsewhere
        settings = self.settings
        self.elsewhere = elsewhere
        if engine is None:
            self.batcher = Unloaded()
            self.about = orjson.dumps({"model": None, **self.served_by})
            unloaded = (503, {"error": UNLOADED})
            self.v2_documents = {**self.v2_documents, "model": unloaded, "model-ready": unloaded}
            return replaced
        self.batcher = Batcher(engine.compute, settings["max_batch_size"], settings["batch_wait_ms"] / 1000,
                               settings["max_queued"], with_rows, LONE_IMAGES if elsewhere else INLINE_IMAGES,
                               requests.joined_pixels, elsewhere, self.recorder)
        described = engine.describe()
        served = served or {}
        self.about = orjson.dumps({"model": "MoE MNIST classifier", **self.served_by, **described, **served,
                                   "batching": f"up to {settings['max_batch_size']} images per model call, "
                                               f"{settings['batch_wait_ms']:g} ms wait",
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        metadata = kserve.model_metadata(engine.backend, engine.experts)
        self.v2_documents = {name: (200, document) for name, document in (
            ("server", kserve.server_metadata(described.get("engine", engine.backend))),
            ("model", {**metadata, "parameters": served} if served else metadata),
            ("live", b""), ("ready", b""), ("model-ready", b""))}
        return replaced

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"]
        asked = kserve.route(path) if path.startswith("/v2") else ("/" if path == "/" else path)
        status = await self.answer(asked, scope, receive, send)
        if self.housekeeper is None and (self.recorder or self.swapper):
            self.start_serving()
        if self.recorder is not None:
            self.recorder.request(asked if asked in ROUTES else "other", status, time.perf_counter() - started)

    async def answer(self, asked, scope, receive, send):
        """Answer one request; returns the status it got (499: the client went away first)."""
        try:
            if asked == "/":
                return await self.own_api(scope, receive, send)
            if asked == "infer":
                return await self.v2_infer(scope, receive, send)
            if asked in kserve.DOCUMENTS:
                return await self.open_inference(scope, send, asked)
            if asked == "/metrics" and self.recorder is not None:
                return await self.scrape(scope, send)
            if asked in kserve.REPOSITORY and self.swapper is not None:
                return await self.repository(scope, receive, send, asked)
            return await respond(send, 404, {"error": f"no {scope['path']} here; POST images to /, or use the Open "
                                                      f"Inference Protocol under /v2/models/{kserve.MODEL}"})
        except requests.RequestError as error:
            return await respond(send, error.status, {"error": str(error)})
        except Full as error:
            return await respond(send, 503, {"error": str(error)}, [(b"retry-after", b"1")])
        except ClientGone:
            return ClientGone.STATUS

    async def own_api(self, scope, receive, send):
        """GET / says what is served; POST / classifies raw or JSON images."""
        if scope["method"] == "GET":
            return await respond(send, 200, self.about)
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served; POST images, or GET /"})
        declared, content_type = length_and_type(scope)
        body = await self.body_of(declared, receive, send)
        if isinstance(body, int):
            return body
        images = await parsed(requests.parse, body, content_type, self.max_request_images)
        rows = await self.batcher.infer(images, client_of(receive))
        return await respond(send, 200, b'{"predictions":[' + b",".join([row[0] for row in rows]) + self.answers_end)

    async def open_inference(self, scope, send, asked):
        """The Open Inference Protocol's health and metadata documents."""
        if scope["method"] != "GET":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at {scope['path']}; GET it"})
        return await respond(send, *self.v2_documents[asked])

    async def repository(self, scope, receive, send, asked):
        """The model repository extension: POST load (a body of {} or {"parameters": {"path": ...}}),
        unload, and the index."""
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at {scope['path']}; POST"})
        body = await self.body_of(length_and_type(scope)[0], receive, send)
        if isinstance(body, int):
            return body
        if asked == "index":
            state = "UNAVAILABLE" if isinstance(self.batcher, Unloaded) else "READY"
            return await respond(send, 200, [{"name": kserve.MODEL, "version": kserve.VERSION, "state": state}])
        if asked == "unload":
            await self.swapper.unload()
        else:
            await self.swapper.load(repository.load_path(body, repository.served_path(self.settings)))
        return await respond(send, 200, {})

    async def v2_infer(self, scope, receive, send):
        """POST /v2/models/moe/infer: JSON tensors or the binary tensor extension."""
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at {scope['path']}; POST"})
        body = await self.body_of(length_and_type(scope)[0], receive, send)
        if isinstance(body, int):
            return body
        length = header(scope, kserve.HEADER_LENGTH.encode()) or None
        pixels, request_id, wanted = await parsed(kserve.parse_infer, body, length, self.max_request_images)
        rows = await self.batcher.infer(pixels, client_of(receive))
        answer, header_length = kserve.encode_infer(np.stack([row[1] for row in rows]),
                                                    np.stack([row[2] for row in rows]), request_id, wanted)
        extra = [] if header_length is None else [(kserve.HEADER_LENGTH.encode(), str(header_length).encode())]
        return await respond(send, 200, answer, extra, b"application/octet-stream" if extra else b"application/json")

    async def scrape(self, scope, send):
        """GET /metrics: every worker's and model process's metrics, in Prometheus's text format."""
        if scope["method"] != "GET":
            return await respond(send, 405, {"error": f"{scope['method']} is not served at /metrics; GET it"})
        self.recorder.flush()
        return await respond(send, 200, metrics.exposition(), content_type=metrics.CONTENT_TYPE)

    def start_serving(self):
        """Begin the worker's own tasks on the running event loop: housekeeping, and the gRPC endpoint
        where one is asked for. uvicorn makes the application inside its loop, so they start before
        the first request; elsewhere the first request starts them."""
        loop = asyncio.get_running_loop()
        self.housekeeper = loop.create_task(self.housekeeping())
        if self.settings.get("grpc_port"):
            from . import grpc_api
            self.grpc_server = loop.create_task(grpc_api.start(self, self.settings["host"],
                                                               self.settings["grpc_port"]))

    async def housekeeping(self):
        """Follow the server's load orders, and write the metrics' observations, on this worker."""
        ticks_per_flush = max(1, round(metrics.FLUSH_S / repository.ORDER_POLL_S))
        for tick in itertools.count(1):
            await asyncio.sleep(repository.ORDER_POLL_S)
            if self.swapper is not None:
                await self.swapper.follow()
            if self.recorder is not None and tick % ticks_per_flush == 0:
                self.recorder.flush()

    async def body_of(self, declared, receive, send):
        """The request's body, or the status of the 413 or 408 that answered it."""
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


# what the metrics' route label can be
ROUTES = frozenset(("/", "infer", "/metrics", "grpc", *kserve.DOCUMENTS, *kserve.REPOSITORY))


def client_of(receive):
    """What says whether the request's client is still there: uvicorn's request cycle, whose
    `disconnected` turns true when the connection closes; None under a server that does not say."""
    cycle = getattr(receive, "__self__", None)
    return cycle if hasattr(cycle, "disconnected") else None


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


GRANIAN_SETTINGS = {"interface": "asgi", "loop": "uvloop", "runtime_mode": "st", "websockets": False,
                    "backlog": 4096, "log_level": "warning", "http": "1"}  # uvloop and one runtime thread, as uvicorn


def serve(settings, host, port, workers):
    """Run the HTTP server's supervisor and its workers until Ctrl-C or SIGTERM (blocks). Under uvicorn
    SIGHUP loads the settings' model again in every worker (repository.py); granian restarts its workers."""
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    if settings.get("http_server") == "granian":
        require_module("granian", "serve.py --http-server granian")
        from granian import Granian
        Granian("moebench.serving.http_app:app", address=host, port=port, workers=workers, factory=True,
                respawn_failed_workers=True, **GRANIAN_SETTINGS).serve()
        return
    require_module("uvicorn", "serve.py")
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_hup(self):  # uvicorn's own restarts every worker, a cold start with requests waiting
            path = repository.served_path(settings)
            try:
                repository.serving(settings, path)
            except UserError as error:
                print(f"SIGHUP: not loaded ({error}); the model served before goes on serving", file=sys.stderr,
                      flush=True)
                return
            repository.Orders(settings["orders"]).write(path)
            print(f"SIGHUP: loading {path} again in every worker", flush=True)

    config = uvicorn.Config("moebench.serving.http_app:app", factory=True, host=host, port=port, workers=workers,
                            **UVICORN_SETTINGS)
    sockets = [config.bind_socket()]
    Supervisor(config, sockets=sockets).run()
