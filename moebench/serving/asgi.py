"""The plain ASGI pieces of serve.py's application: answering, reading a body within a size limit,
and the deadline a body must arrive by."""
import asyncio

import orjson

from .batcher import ClientGone

CLOSE = [(b"connection", b"close")]


async def respond(send, status, payload, headers=(), content_type=b"application/json"):
    """Send the answer; returns its status (what the metrics count)."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
    return status


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
    """The request body, or None once it grows past `limit` bytes (the rest is not read); ClientGone
    where the client went away before it was whole (what did arrive is not a request)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
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


def header(scope, name):
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""
