"""The model behind a server: the runner of one of serve.py's backends (runners/served.py), answering
for float32 pixels."""
import os
import tempfile

import numpy as np



class Engine:
    """The model on one of serve.py's backends' runners, answering for float32 pixels (N, 1, 28, 28):
    what a Ray Serve replica and a worker of the default server each hold."""

    def __init__(self, served, model_bytes=b"", threads=0, precision="auto", checkpoint_path=None):
        """served: the backend's Served (runners/served.py); model_bytes: the ONNX model (engines read the
        file once, so it only lives in a temporary folder), or b"" for a backend made from the checkpoint."""
        self.backend = served.backend
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            with open(path, "wb") as f:
                f.write(model_bytes)
            self.runner = served.make(path, checkpoint_path, threads, precision)
        self.experts = self.compute(np.zeros((1, 1, 28, 28), np.float32))[1].shape[1]  # what the metadata says

    def describe(self):
        return {"backend": self.backend, **self.runner.describe()}

    def compute(self, pixels):
        """(logits, gates) of float32 pixels (N, 1, 28, 28): the engine call, which holds the GIL little
        (a model thread can run it)."""
        return self.runner.predict(pixels)


def engine_of(settings):
    """The engine a server's settings name, its backend's module alone imported."""
    from ..runners.served import BACKENDS
    served = BACKENDS[settings["backend"]]
    model = b""
    if not served.from_checkpoint:
        with open(settings["model"], "rb") as f:
            model = f.read()
    return Engine(served, model, settings["threads"], settings["precision"], settings["checkpoint"])
