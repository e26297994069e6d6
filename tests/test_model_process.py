"""The default server's model process on its own: a worker's batches written into shared memory come
back as the very answers the worker would have computed itself (the JSON bytes, logits and gates),
for uint8 images and float32 tensors, two batches at a time; and it ends when its worker goes."""
import asyncio
import os
import time

import numpy as np

from moebench.serving.engine import engine_of
from moebench.serving.http_app import with_rows
from moebench.serving.model_process import ModelProcess

SETTINGS_ENV = "MOE_TEST_MODEL_PROCESS"


def settings_of(folder):
    return {"model": str(folder / "model.onnx"), "checkpoint": str(folder / "checkpoint.pt"),
            "backend": "onnxruntime", "threads": 1, "precision": "auto", "max_batch_size": 8}


def test_batches_come_back_as_the_workers_own_answers(tiny_models, served_images):
    settings = settings_of(tiny_models)
    images = served_images[0][:13]
    floats = (images[8:].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    engine = engine_of(settings)
    expected = with_rows(engine.compute((images.astype(np.float32) / 255).reshape(-1, 1, 28, 28)))
    model = ModelProcess(settings, SETTINGS_ENV)
    model.wait_until_ready()

    async def two_batches_out():
        first = model.compute(model.put([images[:3], images[3:8]]))  # uint8, as the own API sends them
        second = model.compute(model.put([images[8:10], floats[2:]]))  # UINT8 and FP32 tensors together
        return await first + await second
    try:
        answers = asyncio.run(asyncio.wait_for(two_batches_out(), 60))
    finally:
        model.connection.close()  # as a worker that ends
    assert [answer for answer, _, _ in answers] == [answer for answer, _, _ in expected]
    np.testing.assert_allclose(np.stack([row[1] for row in answers]), np.stack([row[1] for row in expected]),
                               atol=1e-6)
    np.testing.assert_array_equal(np.stack([row[2] for row in answers]) > 0, np.stack([row[2] for row in expected]) > 0)
    assert model.process.wait(30) == 0  # its worker's end is its own


def test_a_model_process_that_cannot_start_is_one_error(tmp_path):
    settings = {**settings_of(tmp_path), "model": os.devnull}
    model = ModelProcess(settings, SETTINGS_ENV)
    started = time.time()
    try:
        model.wait_until_ready()
    except RuntimeError as error:
        assert "the model process did not start" in str(error)
    else:
        raise AssertionError("a model process without a model started")
    assert time.time() - started < 60
    assert model.process.wait(30) != 0
