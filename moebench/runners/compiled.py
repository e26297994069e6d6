"""What compilers and converters make from a model (an IREE module, an MNN model, a LiteRT file), kept
in a cache folder of their own, never beside the user's files, and made again when what is there cannot be read."""
import contextlib
import hashlib
import os
import tempfile
import time

from ..cli import UserError, atomic_path, error_line

CACHE_ENV = "MOEBENCH_CACHE"


def cache_root():
    """$MOEBENCH_CACHE, else ~/.cache/moebench (XDG_CACHE_HOME where it is set)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moebench")


def artifact_path(engine, source, settings, suffix, cache_dir=None):
    """Where `engine`'s build of a model with `settings` (a string) is kept: named by a hash of the
    model (source: its file's path, or a torch model) and the settings, so a changed model or flag never
    reuses a stale build."""
    digest = hashlib.sha256(model_bytes(source) + f"\0{engine}\0{settings}".encode()).hexdigest()[:20]
    return os.path.join(cache_dir or cache_root(), engine, digest + suffix)


def digest(array):
    """A short name for an array's contents (calibration images), for build settings."""
    return hashlib.sha256(array.tobytes()).hexdigest()[:12]


def model_bytes(source):
    """A model file's bytes, or a torch model's weights (its state dict as torch.save writes it)."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read()
    import io

    import torch
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    return buffer.getvalue()


def built(path, build):
    """(path, seconds the build took, or None where the cached one was used): build(tmp) writes the
    artifact to tmp, which replaces path only once it is whole."""
    if os.path.exists(path):
        return path, None
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        build(tmp)
    return path, time.perf_counter() - started


def loaded(path, build, load, what):
    """(load(path), seconds the build took or None): a cached artifact that cannot be loaded (cut
    short, corrupt, from another version) is built again once, and that is said in one line."""
    path, build_s = built(path, build)
    try:
        return load(path), build_s
    except Exception as error:
        if build_s is not None:
            raise UserError(f"{what}: its fresh build {path} could not be loaded ({error_line(error, 300)})")
    print(f"{what}: the cached {path} could not be loaded; building it again", flush=True)
    os.remove(path)
    path, build_s = built(path, build)
    return load(path), build_s


@contextlib.contextmanager
def quiet_output(what):
    """A native tool's own stdout and stderr (file descriptors 1 and 2) kept out of the user's
    terminal; their last line is in the error if the block fails."""
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as log:
        flush_c_streams()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as error:
            flush_c_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            if isinstance(error, UserError):  # already one line for the user
                raise
            log.seek(0)
            said = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
            raise UserError(f"{what} failed ({error_line(error, 200)}{'; ' + said[-1][:200] if said else ''})")
        finally:
            flush_c_streams()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def flush_c_streams():
    """What native code printed through C's stdio buffers goes out now, to wherever fd 1 and 2 point."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
