"""A worker's side of the model repository extension (repository.py): make a model beside the one
serving, swap, and retire the old one once it has answered every request it holds."""
import asyncio
import os
import sys

from . import kserve, repository
from .engine import engine_of
from .model_process import ModelProcess
from .requests import RequestError


UNLOADED = f"model {kserve.MODEL} is unloaded; POST /v2/repository/models/{kserve.MODEL}/load loads it"


class Unloaded:
    """What a worker whose model was unloaded has in its batcher's place: every request gets a 503
    that says how to load it."""
    waiting = handed_over = 0

    async def infer(self, images, client=None):
        raise RequestError(503, UNLOADED)

    def stop(self):
        pass


def made(settings, path, settings_env):
    """(engine, model process, what GET /v2/models/moe says of it) of the model at `path`, checked
    and both ready (blocks, reading and hashing the file: run it on a thread); the model process is
    stopped if either fails."""
    settings = repository.serving(settings, path)
    process = ModelProcess(settings, settings_env)
    try:
        engine = engine_of(settings)
        process.wait_until_ready()
    except BaseException:
        process.close()
        raise
    return engine, process, repository.describe(path)


class Swapper:
    """Loads and unloads one worker's model. `application.install(engine, model process, described)`
    puts a model in service and returns the (batcher, model process) it replaced."""

    def __init__(self, application, settings, settings_env, generation=0):
        self.application, self.settings, self.settings_env = application, settings, settings_env
        self.orders = repository.Orders(settings["orders"])
        self.generation = generation
        self.lock = asyncio.Lock()

    async def load(self, path):
        """Serve the model at `path` here, then order every worker to; a RequestError (400) if it
        cannot be served, and the model before serves on."""
        async with self.lock:
            try:
                made_here = await self.make(path)
            except Exception as error:
                raise repository.refused(error)
            self.generation = self.orders.write(path)
            self.swap(*made_here)

    async def unload(self):
        async with self.lock:
            self.generation = self.orders.write(None)
            self.swap(None, None, None)

    async def follow(self):
        """Do what the last order says, if it is newer than what this worker serves."""
        order = self.orders.changed()
        if order is None or order["generation"] <= self.generation:
            return
        async with self.lock:
            self.generation = order["generation"]
            if order["model"] is None:
                return self.swap(None, None, None)
            try:
                made_here = await self.make(order["model"])
            except Exception as error:
                print(f"worker {os.getpid()}: {repository.refused(error)}", file=sys.stderr, flush=True)
                return
            self.swap(*made_here)

    async def make(self, path):
        """made() on a thread: checking, reading and hashing the file stay off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, made, self.settings, path, self.settings_env)

    def swap(self, engine, process, described):
        batcher, old_process = self.application.install(engine, process, described)
        asyncio.get_running_loop().create_task(retire(batcher, old_process))


async def retire(batcher, process):
    """Stop a replaced model once its batcher has answered everything it holds."""
    while batcher.waiting or batcher.handed_over:
        await asyncio.sleep(0.05)
    batcher.stop()
    if process is not None:
        process.close()
