"""What every script shares at its edges: one-line errors, flag types, atomic file writes."""
import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager



class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""
    for_the_user = True


def for_the_user(error):
    """A UserError, or one of the model files' own errors of that kind (data.DataError,
    config.StructureError), which carry the same mark because they import nothing from here."""
    return getattr(error, "for_the_user", False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): 'error: --flag: what is wrong'."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run(main):
    """Call main(); turn a UserError or Ctrl-C into one line on stderr and a non-zero exit."""
    try:
        main()
    except Exception as error:
        if not for_the_user(error):
            raise
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def error_line(error, limit=200, last=False):
    """One line for any caught exception: its type and the first (or last) non-empty line of its
    message, cut to `limit` characters; the type alone when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0])[:limit] if lines else ""
    if for_the_user(error) and text:  # already written for the user
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def require_module(name, purpose, install="pip install -r requirements.txt"):
    """import `name`, or one line saying what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise UserError(f"{purpose} needs the Python module {name}, which is not installed "
                        f"({error_line(error)}); {install}")


def writable_file(text):
    """A flag naming a file to write: its folder is made if missing and must be writable, checked
    when the flags are read, not after a long run."""
    folder = os.path.dirname(os.path.abspath(text))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot make the folder {folder} ({error.strerror or error}); "
                                         "choose a path in a writable folder")
    if not os.access(folder, os.W_OK) or os.path.isdir(text) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text} (its folder or the file is read-only, or it is "
                                         "a folder); choose a path in a writable folder")
    return text


def append_json_line(path, record):
    """One JSON line appended to path (a results log several scripts share)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:
        raise UserError(f"cannot append to {path} ({error.strerror or error_line(error)}); "
                        "choose a writable path for --json")


def checked_number(text, convert, expected, allowed, rule):
    """A flag value converted by `convert` and held to `allowed`; anything else is one argparse line."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text):
    return checked_number(text, int, "a positive integer", lambda v: v > 0, "must be a positive integer")


def port_number(text):
    return checked_number(text, int, "a port number", lambda v: 0 <= v <= 65535, "must be between 0 and 65535")


def non_negative_int(text):
    return checked_number(text, int, "an integer", lambda v: v >= 0, "must be >= 0")


def positive_float(text):
    return checked_number(text, float, "a number", lambda v: v > 0, "must be > 0")


def non_negative_float(text):
    return checked_number(text, float, "a number", lambda v: v >= 0, "must be >= 0")


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds,
    so an interrupted write never leaves a half-written file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error_line(error)}); make {directory} "
                        "writable or choose a path in a writable folder")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise UserError(f"cannot write {path} ({error.strerror or error_line(error)}); "
                            "choose a path that is not a folder or a read-only file")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; it replaces `path` (and everything in it) only if the
    block succeeds, so a report's files never mix two runs, nor an interrupted run's leftovers."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def save_figure(fig, path):
    """A matplotlib figure to a PNG at path, laid out and written atomically, then closed."""
    import matplotlib.pyplot as plt
    top = 1 - 0.4 / fig.get_figheight() if fig.get_suptitle() else 1  # room for the title over the panels
    fig.tight_layout(rect=(0, 0, 1, top))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
