"""What every script shares at its edges: one-line errors, flag types, atomic file writes."""
import argparse
import os
import sys
import tempfile
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): 'error: --flag: what is wrong'."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run(main):
    """Call main(); turn a UserError or Ctrl-C into one line on stderr and a non-zero exit."""
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


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


def non_negative_float(text):
    return checked_number(text, float, "a number", lambda v: v >= 0, "must be >= 0")


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds,
    so an interrupted write never leaves a half-written file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_figure(fig, path):
    """A matplotlib figure to a PNG at path, laid out and written atomically, then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
