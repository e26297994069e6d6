"""The model of one default-server worker in a process of its own, fed through shared memory.

On the worker's event loop the model and the answers' encoding cost more than the HTTP work, and on a
thread of the worker's own the GIL makes a model call wait for the busy event loop (docs/serving.md
has both measured). So each worker starts one model process: the worker writes a batch's pixels
into memory both share and sends one short message; the model process computes, encodes each
image's answer (the JSON of the server's own API) and the logits and gates into the shared memory,
and answers with one short message that the worker's event loop reads like any socket. Two batches
are handed over at a time, so the next one is ready when one is done; the requests that arrive
meanwhile make the batch after.

The model process ends when its worker does (the socket closes, or Linux's parent-death signal); a
worker whose model process dies exits, and uvicorn's supervisor starts a new worker and with it a new
model process.

    python -m moebench.serving.model_process FD   (started by ModelProcess, never by hand)"""
import asyncio
import collections
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np

from . import metrics, requests
from .engine import engine_of
from .server_process import end_with_parent

MESSAGE = struct.Struct("<iii")  # to the model process (slot, images, kind); back (slot, images or bytes, status)
IN_FLIGHT = 2  # batches handed over at a time: the next one waits in its slot while one computes
UINT8, FLOAT32 = 0, 1  # how the batch's pixels lie in the shared memory
DONE, FAILED = 0, 1
ANSWER_BYTES = 320  # room per image for its JSON answer, plus EXPERT_BYTES per chosen expert
EXPERT_BYTES = 40
STARTUP_S = 300  # a model process must be ready within this (building the fused operator may take minutes)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Layout:
    """The shared memory of one worker and its model process: IN_FLIGHT slots, each with room for
    one batch and its results."""

    def __init__(self, max_batch_size, experts):
        self.shapes = {"pixels": (np.float32, (max_batch_size, 1, 28, 28)),
                       "images": (np.uint8, (max_batch_size, requests.PIXELS_PER_IMAGE)),
                       "logits": (np.float32, (max_batch_size, 10)), "gates": (np.float32, (max_batch_size, experts)),
                       "ends": (np.int64, (max_batch_size,)),
                       "answers": (np.uint8, (max_batch_size * (ANSWER_BYTES + EXPERT_BYTES * experts),))}
        self.slot_bytes = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in self.shapes.values())
        self.size = IN_FLIGHT * self.slot_bytes

    def slots(self, buffer):
        """Each slot's arrays over `buffer` (the mapped shared memory)."""
        slots = []
        for index in range(IN_FLIGHT):
            arrays, offset = {}, index * self.slot_bytes
            for name, (dtype, shape) in self.shapes.items():
                arrays[name] = np.ndarray(shape, dtype, buffer, offset)
                offset += arrays[name].nbytes
            slots.append(types.SimpleNamespace(**arrays))
        return slots


def shared_memory(size):
    """An anonymous file in memory (no name, nothing left behind) and its mapping."""
    descriptor = os.memfd_create("moe-batches")
    os.ftruncate(descriptor, size)
    return descriptor, mmap.mmap(descriptor, size)


def compute_batch(engine, slots, slot, images, kind):
    """Run one batch in the model process: results into its slot of the shared memory; the reply."""
    arrays = slots[slot]
    try:
        pixels = requests.to_pixels(arrays.images[:images]) if kind == UINT8 else arrays.pixels[:images]
        logits, gates = engine.compute(pixels)
        arrays.logits[:images], arrays.gates[:images] = logits, gates
        encoded = requests.answers_json(logits, gates)
        joined = b"".join(encoded)
        if len(joined) > arrays.answers.size:
            raise ValueError(f"the answers of {images} images take {len(joined)} bytes, over the shared memory's "
                             f"{arrays.answers.size}")
        arrays.answers[:len(joined)] = np.frombuffer(joined, np.uint8)
        arrays.ends[:images] = np.cumsum([len(answer) for answer in encoded])
        return MESSAGE.pack(slot, images, DONE)
    except Exception as error:  # the worker fails this batch's requests (500) and goes on
        message = f"{type(error).__name__}: {error}".encode()[:arrays.answers.size]
        arrays.answers[:len(message)] = np.frombuffer(message, np.uint8)
        return MESSAGE.pack(slot, len(message), FAILED)


def serve_batches(connection, settings):
    """The model process: make the engine, hand the worker the shared memory, then compute batches
    until the worker goes away."""
    end_with_parent()
    if os.getppid() == 1:  # the worker died before the line above took effect
        return
    engine = engine_of(settings)
    layout = Layout(settings["max_batch_size"], engine.experts)
    descriptor, buffer = shared_memory(layout.size)
    slots = layout.slots(buffer)
    ready = json.dumps({"experts": engine.experts}).encode()
    socket.send_fds(connection, [struct.pack("<i", len(ready)) + ready], [descriptor])
    os.close(descriptor)
    recorder = metrics.Recorder() if metrics.enabled() else None
    flushed = time.perf_counter()
    while True:
        if recorder is not None and not select.select([connection], [], [], metrics.FLUSH_S)[0]:
            recorder.flush()  # idle: what the last batches added is written
            flushed = time.perf_counter()
            continue
        message = receive_exactly(connection, MESSAGE.size)
        if message is None:
            return
        slot, images, kind = MESSAGE.unpack(message)
        started = time.perf_counter()
        connection.sendall(compute_batch(engine, slots, slot, images, kind))
        if recorder is not None:
            recorder.model_call(images, time.perf_counter() - started)
            if started - flushed > metrics.FLUSH_S:
                recorder.flush()
                flushed = started


def receive_exactly(connection, size):
    data = b""
    while len(data) < size:
        more = connection.recv(size - len(data))
        if not more:
            return None
        data += more
    return data


class ModelProcess:
    """A worker's side of its model process: start it, write batches, await their results."""

    def __init__(self, settings, settings_env):
        here, there = socket.socketpair()
        environment = {**os.environ, settings_env: json.dumps(settings),
                       "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", __spec__.name, str(there.fileno()), settings_env],
                                        pass_fds=[there.fileno()], env=environment)
        there.close()
        self.connection = here
        self.max_batch_size = settings["max_batch_size"]
        self.in_flight = IN_FLIGHT
        self.futures = collections.deque()  # the batches handed over, in order
        self.handed = 0  # batches handed over so far: batch n uses slot n % IN_FLIGHT
        self.received = b""
        self.watched = False
        self.slots = None

    def wait_until_ready(self):
        """Block until the model process has its engine and has shared its memory."""
        self.connection.settimeout(STARTUP_S)
        try:
            ready, descriptor = self.handshake()
        except (OSError, ValueError) as error:
            self.process.kill()
            raise RuntimeError(f"the model process did not start ({error}); its error is above") from None
        layout = Layout(self.max_batch_size, ready["experts"])
        self.slots = layout.slots(mmap.mmap(descriptor, layout.size))
        os.close(descriptor)
        self.connection.setblocking(False)

    def handshake(self):
        header, descriptors, _, _ = socket.recv_fds(self.connection, 4, 1)
        if len(header) < 4 or len(descriptors) != 1:
            raise ValueError("it exited before it was ready")
        ready = receive_exactly(self.connection, struct.unpack("<i", header)[0])
        if ready is None:
            raise ValueError("it exited before it was ready")
        return json.loads(ready), descriptors[0]

    def put(self, pieces):
        """Write a batch (the requests' uint8 or float32 images) into the next slot: (slot, images, kind).
        The Batcher hands over at most IN_FLIGHT batches at a time, so that slot is free."""
        slot = self.handed % IN_FLIGHT
        self.handed += 1
        arrays = self.slots[slot]
        images = sum(len(piece) for piece in pieces)
        if all(piece.dtype == np.uint8 for piece in pieces):  # the model process converts them
            np.concatenate([piece.reshape(len(piece), -1) for piece in pieces], out=arrays.images[:images])
            return slot, images, UINT8
        arrays.pixels[:images] = requests.joined_pixels(pieces)
        return slot, images, FLOAT32

    def compute(self, batch):
        """Hand over a batch that put() wrote; a future of [(answer JSON bytes, logits row, gates row)]
        per image."""
        loop = asyncio.get_running_loop()
        if not self.watched:
            loop.add_reader(self.connection.fileno(), self.on_reply)
            self.watched = True
        future = loop.create_future()
        self.futures.append(future)
        try:
            self.connection.send(MESSAGE.pack(*batch))
        except OSError:
            self.ended()
        return future

    def on_reply(self):
        try:
            data = self.connection.recv(MESSAGE.size * IN_FLIGHT)
        except BlockingIOError:
            return
        except OSError:  # reset: it died with a message unread
            data = b""
        if not data:
            self.ended()
        self.received += data
        while len(self.received) >= MESSAGE.size:
            slot, count, status = MESSAGE.unpack_from(self.received)
            self.received = self.received[MESSAGE.size:]
            future = self.futures.popleft()
            if status == FAILED:
                future.set_exception(RuntimeError(bytes(self.slots[slot].answers[:count]).decode(errors="replace")))
            else:
                future.set_result(self.results(self.slots[slot], count))

    @staticmethod
    def results(arrays, count):
        logits, gates = arrays.logits[:count].copy(), arrays.gates[:count].copy()
        ends = arrays.ends[:count].tolist()
        answers = bytes(arrays.answers[:ends[-1]])
        return [(answers[start:end], logits[k], gates[k]) for k, (start, end) in enumerate(zip([0] + ends[:-1], ends))]

    def close(self):
        """Stop the model process of a model taken out of service (or one that did not start); the
        worker goes on."""
        if self.watched:
            asyncio.get_running_loop().remove_reader(self.connection.fileno())
            self.watched = False
        self.connection.close()
        self.process.terminate()
        threading.Thread(target=self.process.wait, daemon=True).start()  # reaped, never a zombie

    def ended(self):
        """The model process is gone: this worker cannot answer, so it ends and the supervisor starts
        a new one (with a new model process)."""
        print(f"the model process {self.process.pid} ended (exit {self.process.poll()}); this worker "
              f"{os.getpid()} stops so that a new one takes over", file=sys.stderr, flush=True)
        os._exit(1)


def main():
    connection = socket.socket(fileno=int(sys.argv[1]))
    serve_batches(connection, json.loads(os.environ[sys.argv[2]]))


if __name__ == "__main__":
    main()
