"""The test images every backend is measured on, as the model's input contract wants them."""
import numpy as np


def load_test_set(data_dir, limit=None):
    """Test images as a contiguous float32 numpy array (N, 1, 28, 28) and int64 labels, loaded once."""
    from data import load_split  # the scripts' side only: a Ray worker imports this package without data.py
    images, labels = load_split("test", data_dir, limit)
    return np.ascontiguousarray(images.numpy()), labels.numpy()
