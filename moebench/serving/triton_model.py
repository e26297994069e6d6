"""The model as Triton Inference Server's python backend runs it (serve.py --triton copies this file
into a model repository in a scratch folder): ONNX Runtime on the CPU, one session per instance, every
batch Triton's dynamic batcher forms is one model call. Tensors cross over DLPack:
under numpy 2, pb_utils.Tensor(name, ndarray) answers "output tensor shape does not match size",
and an input's as_numpy() reads the same wrong values whatever the request sent."""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, config):
        import onnxruntime
        folder = os.path.join(config["model_repository"], config["model_version"])
        with open(os.path.join(folder, "settings.json")) as f:
            threads = json.load(f)["threads"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])

    def execute(self, requests):
        inputs = [np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "pixels")) for request in requests]
        logits, gates = self.session.run(["logits", "gates"], {"pixels": np.concatenate(inputs)})
        responses, at = [], 0
        for images in inputs:
            rows = slice(at, at + len(images))
            at += len(images)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor.from_dlpack("logits", np.ascontiguousarray(logits[rows])),
                pb_utils.Tensor.from_dlpack("gates", np.ascontiguousarray(gates[rows]))]))
        return responses
