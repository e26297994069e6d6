"""Building the fused INT8 operator (moebench/fused.py): where it is built, and every way a build can
fail, each one clear line."""
import os
import time

import pytest

from moebench import fused
from moebench.cli import UserError


def test_torch_extensions_dir_says_where_the_operator_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert fused.build_directory("moe_fused_vnni").startswith(str(tmp_path))


@pytest.fixture
def fresh_build_folder(tmp_path, monkeypatch):
    """Builds go to an empty folder, as on a machine that never built the operator."""
    def folder(name):
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        return str(path)
    monkeypatch.setattr(fused, "build_directory", folder)
    return tmp_path


def test_a_missing_compiler_is_one_clear_line(fresh_build_folder, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"needs a C\+\+ compiler \(no-such-compiler is not on the PATH\): apt-get"):
        fused.build.__wrapped__("portable")


def test_a_failed_build_keeps_the_compiler_s_whole_output_in_a_log(fresh_build_folder, monkeypatch, capsys):
    compiler = fresh_build_folder / "failing-c++"  # answers --version as c++ does, then fails every compile
    compiler.write_text('#!/bin/sh\n[ "$1" = --version ] && exec c++ --version\n'
                        'echo "first line of a long error"; echo "last line: no space left"; exit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.raises(UserError, match=r"building the fused operator's portable path failed .*full output is in "
                                        r".*build-error\.log") as raised:
        fused.build.__wrapped__("portable")
    log = str(raised.value).rsplit(" ", 1)[-1]
    assert "first line of a long error" in open(log).read()  # the whole output, not its last line
    assert "building the fused INT8 operator, portable path" in capsys.readouterr().out


def test_a_lock_is_waited_for_while_a_build_may_run_and_taken_over_once_stale(tmp_path, capsys):
    """A fresh lock: another build runs; it is waited for until that build removes it. An old one was
    left by a killed build: removed at once, never waited on forever (PyTorch's loader would)."""
    import threading
    lock = tmp_path / "lock"
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()  # the other build ends
    started = time.time()
    fused.clear_stale_lock(str(tmp_path), poll_s=0.05)
    assert 0.4 < time.time() - started < 5 and "waiting for another build" in capsys.readouterr().out
    lock.write_text("")
    old = time.time() - 2 * fused.LOCK_STALE_S
    os.utime(lock, (old, old))
    fused.clear_stale_lock(str(tmp_path))
    assert not lock.exists() and "removed a stale lock left by an interrupted build" in capsys.readouterr().out
