"""The Open Inference Protocol's model repository extension on serve.py's default server: POST
/v2/repository/models/moe/load loads the model again from --model (an empty body or {}) or from
the file {"parameters": {"path": ...}} names, POST .../unload stops serving it, and SIGHUP to serve.py
loads --model again, as a load request would.

The worker that takes a load request makes the new model first (its engine and model process,
beside the ones serving), so a model that cannot be served is refused with one line while the old
one serves on; then it swaps and writes the order, a small file all of one server's processes share:
{"generation": n, "model": path, or null once unloaded}. Every other worker reads the order's
generation (a stat every ORDER_POLL_S) and swaps the same way. A swap sends new requests to the new
model and lets the old one finish what it holds, so no request fails or waits for a cold start, and
each answer comes whole from one model, the old or the new. A worker started later (one replacing a
worker that died) serves what the last order says."""
import hashlib
import json
import os

import orjson

from .. import contract
from ..cli import UserError, atomic_path
from ..runners.served import BACKENDS
from .requests import RequestError

ORDER_POLL_S = 0.25


def checked_model_bytes(path):
    """The ONNX model file's bytes, once it has passed the contract and has the 'gates' output."""
    model = contract.check_onnx(path)
    if contract.GATES not in [o.name for o in model.graph.output]:
        raise UserError(f"{path} has no '{contract.GATES}' output, which the answers need; "
                        "export it with export_onnx.py")
    with open(path, "rb") as f:
        return f.read()


def served_path(settings):
    """The file a server's settings serve: the checkpoint for a backend made from it, else the model."""
    return settings["checkpoint"] if BACKENDS[settings["backend"]].from_checkpoint else settings["model"]


def serving(settings, path):
    """The settings with `path` as the file served; the file checked first where it is an ONNX model."""
    if BACKENDS[settings["backend"]].from_checkpoint:
        return {**settings, "checkpoint": path}
    checked_model_bytes(path)
    return {**settings, "model": path}


def describe(path):
    """What GET /v2/models/moe says of the model file served: its path and sha256."""
    with open(path, "rb") as f:
        return {"path": os.path.abspath(path), "sha256": hashlib.sha256(f.read()).hexdigest()}


def load_path(body, default):
    """The model file a load request names: {"parameters": {"path": ...}}, or `default` for an empty
    body or {}."""
    if not body.strip():
        return default
    try:
        request = orjson.loads(body)
    except ValueError as error:
        raise RequestError(400, f"the load request's JSON does not parse ({error}); send {{}} or "
                                "{\"parameters\": {\"path\": \"model.onnx\"}}")
    path = ((request.get("parameters") or {}) if isinstance(request, dict) else {}).get("path", default)
    if not isinstance(path, str) or not path:
        raise RequestError(400, "\"parameters\": {\"path\": ...} must name a model file")
    if not os.path.isfile(path):
        raise RequestError(400, f"{path}: no such file on the server; name a model file the server can read")
    return os.path.abspath(path)


def refused(error):
    """A model the server cannot serve, as the load request's 400."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return RequestError(400, f"not loaded ({message.splitlines()[0] if message else type(error).__name__}); "
                             "the model served before goes on serving")


class Orders:
    """The order file of one server's processes."""

    def __init__(self, path):
        self.path = path
        self.seen = None  # the file's (size, mtime) when last read

    def read(self):
        """The order, or None where there is none yet."""
        try:
            with open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def changed(self):
        """The order, if the file changed since the last call; else None."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        stamp = (status.st_size, status.st_mtime_ns)
        if stamp == self.seen:
            return None
        self.seen = stamp
        return self.read()

    def write(self, model):
        """Order every process to serve `model` (a path, or None: unloaded); returns its generation."""
        last = self.read()
        generation = (last["generation"] if last else 0) + 1
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            json.dump({"generation": generation, "model": model}, f)
        return generation
