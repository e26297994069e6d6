"""A runner: one backend with the model loaded, ready to answer, holding its engine's own handle."""
from dataclasses import dataclass, field
from typing import Any, Callable

from ..cli import UserError
from ..measuring.clock import Clock


@dataclass
class Runner:
    """predict(pixels) -> (logits, gates or None) as numpy, for float32 pixels (N, 1, 28, 28);
    logits(pixels) skips the gates' copy where an engine can; describe() says what really ran
    (engine, provider or device, precision, threads); clock(timing) says how to time it: "host"
    (end to end from host arrays) always, "resident" where the engine can hold inputs on its device.
    close() lets the engine go."""
    name: str
    predict: Callable
    described: dict
    engine: Any = None  # the engine's handle: an InferenceSession, an OpenVINO CompiledModel, a torch module
    logits: Callable = None
    clocks: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    release: Callable = None  # what close() calls besides dropping the handle

    def __post_init__(self):
        if self.logits is None:
            self.logits = lambda pixels: self.predict(pixels)[0]
        self.clocks = {"host": Clock(self.logits), **self.clocks}

    def describe(self):
        return dict(self.described)

    def clock(self, timing="host"):
        if timing not in self.clocks:
            raise UserError(f"{self.name} has no {timing} timing (it has {', '.join(self.clocks)})")
        return self.clocks[timing]

    def close(self):
        if self.release:
            self.release()
        self.engine = self.predict = self.logits = None
        self.clocks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Runner({self.name!r}, {self.described})"


def plural(count, noun):
    """'1 thread', '2 threads': for a runner's name."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
