"""What the registry's runners are made from, each made once when first asked for: the checkpoint's
model per routing, its ONNX exports (checked against torch before they appear), their FP16 and INT8
copies, and training images for calibration."""
import os

import config

from .. import checkpoint, convert
from . import onnx_runtime


class Sources:
    """What runners are made from, each made once when first asked for: the checkpoint's model per
    routing, its ONNX exports (checked against torch before they appear), their FP16 and INT8
    copies, and training images for calibration. `onnx_files` names exports that already exist."""

    def __init__(self, checkpoint_path=checkpoint.DEFAULT_PATH, workdir=None, test_set=None, data_dir="data",
                 onnx_files=None, calibration_images=1000):
        self.checkpoint_path, self.workdir, self.test_set = checkpoint_path, workdir, test_set
        self.data_dir, self.calibration_images = data_dir, calibration_images
        self.files = {key if isinstance(key, tuple) else (key, "torchscript"): path
                      for key, path in (onnx_files or {}).items()}
        self.made = {}

    @classmethod
    def of_model(cls, model, structure, workdir, test_set):
        """Sources for weights that are no checkpoint (the sweep's random models)."""
        import copy
        sources = cls(None, workdir, test_set)
        for routing in config.ROUTINGS:
            sources.made[("model", routing)] = copy.deepcopy(model)
            sources.made[("model", routing)].moe.routing = routing
        sources.made["structure"] = structure
        return sources

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def model(self, routing="dense"):
        return self.once(("model", routing), lambda: checkpoint.load_model(
            self.checkpoint_path, {"ROUTING": routing})[0])

    @property
    def structure(self):
        """The checkpoint's structure; an export's metadata where only exports were given."""
        def read():
            if self.files and not (self.checkpoint_path and os.path.exists(self.checkpoint_path)):
                return onnx_runtime.stored_structure(next(iter(self.files.values())))
            return checkpoint.load_model(self.checkpoint_path)[1]
        return self.once("structure", read)

    def scratch(self, name):
        return os.path.join(self.workdir, name)

    def onnx(self, routing="dense", exporter="torchscript"):
        if (routing, exporter) not in self.files:
            import torch

            from ..export import write_checked
            images, labels = self.test_set
            path = self.scratch(config.onnx_path(routing, exporter))
            write_checked(self.model(routing), {**self.structure, "ROUTING": routing}, path, exporter,
                          torch.from_numpy(images), torch.from_numpy(labels))
            self.files[(routing, exporter)] = path
        return self.files[(routing, exporter)]

    def fp16(self):
        return self.once("fp16", lambda: convert.fp16_copy(self.onnx(), self.scratch("fp16.onnx")))

    def calibration(self):
        from data import load_split
        return self.once("calibration", lambda: load_split("train", self.data_dir, self.calibration_images)[0].numpy())

    def int8(self, method="dynamic", per_channel=False, reduce_range=False, routing="dense"):
        key = ("int8", method, per_channel, reduce_range, routing)
        target = self.scratch(f"int8-{method.split()[0]}-{int(per_channel)}{int(reduce_range)}-{routing}.onnx")
        return self.once(key, lambda: convert.quantize(self.onnx(routing), target, method,
                                                       self.calibration() if method != "dynamic" else None,
                                                       per_channel, reduce_range))
