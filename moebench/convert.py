"""Copies of an exported model in another precision: FP16 (fp32 inputs and outputs kept) and INT8
from ONNX Runtime's quantizer, dynamic or static QDQ calibrated on training images."""
import logging
import os

import onnx

from . import contract
from .cli import atomic_path


def derived_copy(path, suffix, transform, target=None):
    """Write transform(the ONNX model at path) to target, by default beside it as <stem><suffix>."""
    target = target or os.path.splitext(path)[0] + suffix
    converted = transform(contract.load_onnx(path))
    with atomic_path(target) as tmp:
        onnx.save(converted, tmp)
    return target


def fp16_copy(path, target=None):
    """<model>.fp16.onnx (or target): fp16 weights and arithmetic, fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return derived_copy(path, ".fp16.onnx", lambda model: convert_float_to_float16(model, keep_io_types=True),
                        target)


class TrainingImages:
    """onnxruntime's CalibrationDataReader protocol over the first N training images."""

    def __init__(self, images, batch_size=100):
        self.batches = iter([{contract.PIXELS: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize(source, target, method, calibration=None, per_channel=False, reduce_range=False):
    """Write an INT8 copy of `source`: method 'dynamic', or 'static QDQ' calibrated on `calibration`
    (training images, float32 (N, 1, 28, 28))."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer dumps every unknown NonZero shape
    # Only the matrix ops, where all the arithmetic is: with QDQ also around the loop routing's
    # Gather/ScatterElements, onnxruntime 1.31.1 crashes (segfault) running the static model.
    options = {"per_channel": per_channel, "reduce_range": reduce_range,
               "op_types_to_quantize": ["Gemm", "MatMul"]}
    contract.check_onnx(source)
    with atomic_path(target) as tmp:
        if method == "dynamic":
            quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, **options)
        else:
            quantize_static(source, tmp, TrainingImages(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, **options)
    return target
