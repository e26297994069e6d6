"""The model behind a server: one of the registry's servable runners, answering for uint8 images."""
import os
import tempfile

from .requests import answers, to_pixels


class Engine:
    """The model on one of the registry's served runners, answering for uint8 images: what a Ray
    Serve replica and a worker of the default server each hold."""

    def __init__(self, served, model_bytes=b"", threads=0, precision="auto", checkpoint_path=None):
        """served: the registry's Served for the backend; model_bytes: the ONNX model (engines read the
        file once, so it only lives in a temporary folder), or b"" for a backend made from the checkpoint."""
        self.backend = served.backend
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            with open(path, "wb") as f:
                f.write(model_bytes)
            self.runner = served.make(path, checkpoint_path, threads, precision)

    def describe(self):
        return {"backend": self.backend, **self.runner.describe()}

    def compute(self, images_uint8):
        """(logits, gates): the engine call, which holds the GIL little (a model thread can run it)."""
        return self.runner.predict(to_pixels(images_uint8))

    def classify(self, images_uint8):
        return answers(*self.compute(images_uint8))
