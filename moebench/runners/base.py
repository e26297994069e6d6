"""A runner: one backend with the model loaded, ready to answer."""
from .. import measure


class Runner:
    """predict(pixels) -> (logits, gates or None) as numpy, for float32 pixels (N, 1, 28, 28);
    describe() says what really ran (engine, provider or device, precision, threads); clock() says
    how to time it: end to end from host arrays unless the backend gives another mode."""

    def __init__(self, name, predict, described, logits=None, clock=None):
        self.name, self.predict, self.described = name, predict, described
        self.logits = logits or (lambda pixels: predict(pixels)[0])  # some engines skip the gates' copy
        self._clock = clock

    def describe(self):
        return dict(self.described)

    def clock(self):
        return self._clock or measure.Clock(self.logits)

    def timed_by(self, clock):
        """The same runner, timed another way (device-resident inputs, ...)."""
        self._clock = clock
        return self

    def __repr__(self):
        return f"Runner({self.name!r}, {self.described})"
