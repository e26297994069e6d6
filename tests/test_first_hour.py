"""What a new user meets first: the smoke run never touches their trained files, a crafted
checkpoint runs nothing, and every failure on the way is one line naming the flag or file."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import export_onnx
import torch_infer
from moebench import checkpoint
from moebench.cli import UserError, atomic_path, error_line
from moebench.runners import pytorch
from conftest import ROOT, USER_FILES, one_line_error, run_script, sha256


def test_the_smoke_run_works_and_leaves_the_user_s_trained_files_byte_identical(smoke_run, smoke_results):
    """run_all.sh --quick end to end, in a copy of the repository whose root holds a user's trained
    files: they and results/ are byte for byte what they were, and every report is in results/quick."""
    _, repo, before = smoke_run
    assert "results/benchmark.json" in before
    assert {name: sha256(repo / name) for name in before} == before
    for name in USER_FILES + ("results.jsonl", "benchmark.json", "sweep.json", "loadgen.json", "routing.png"):
        assert (smoke_results / name).stat().st_size > 0, name


def test_export_writes_both_graphs_the_other_scripts_read_by_default(tiny_models, mnist_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = export_onnx.main(["--checkpoint", str(tiny_models / "checkpoint.pt"), "--data-dir", mnist_dir,
                                "--test-limit", "100"])
    assert written == ["model.onnx", "model.loop.onnx"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "it-ran"

    class RunsACommand:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"structure": {}, "state_dict": {}, "payload": RunsACommand()}, str(tmp_path / "evil.pt"))
    for script, flag in (("export_onnx.py", "--checkpoint"), ("torch_infer.py", "--model"),
                         ("plot_routing.py", "--checkpoint")):
        line = one_line_error(run_script(script, flag, str(tmp_path / "evil.pt")))
        assert "evil.pt is refused" in line and "system" in line, line
    assert not marker.exists()


def test_checkpoints_train_py_writes_still_load(tiny_models):
    model, structure, state = checkpoint.load_model(str(tiny_models / "checkpoint.pt"))
    assert structure["EXPERTS"] == 4 and "optimizer" in state and "history" in state


def test_json_into_a_place_that_cannot_be_written_fails_before_the_run(tiny_models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("onnx_cpu_infer.py", "--model", str(tiny_models / "model.onnx"),
                        "--json", str(blocker / "results.jsonl"))
    line = one_line_error(result)
    assert line.startswith("error: argument --json") and "a-file" in line, line
    assert "accuracy" not in result.stdout  # refused at once, not after the whole run


def test_json_into_a_missing_folder_makes_it(tiny_models, mnist_dir, tmp_path):
    target = tmp_path / "new" / "folder" / "results.jsonl"
    result = run_script("onnx_cpu_infer.py", "--model", str(tiny_models / "model.onnx"), "--data-dir", mnist_dir,
                        "--test-limit", "50", "--latency-runs", "5", "--quiet", "--json", str(target))
    assert result.returncode == 0, result.stderr
    assert '"accuracy"' in target.read_text()


def test_a_derived_copy_that_cannot_be_written_is_one_line(tiny_models, mnist_dir, tmp_path):
    shutil.copy(tiny_models / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "model.fp16.onnx").mkdir()  # where the fp16 copy goes stands a folder
    line = one_line_error(run_script("onnx_fp16_infer.py", "--model", str(tmp_path / "model.onnx"),
                                     "--data-dir", mnist_dir, "--test-limit", "50"))
    assert line.startswith("error: cannot write") and "model.fp16.onnx" in line, line


def test_a_folder_without_write_permission_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(UserError, match=r"cannot write .*out\.onnx \(Permission denied\); make .* writable"):
        with atomic_path(tmp_path / "out.onnx"):
            pass


def test_a_variant_that_cannot_be_built_does_not_end_the_default_run(tiny_models, mnist_dir, monkeypatch,
                                                                     capsys):
    def broken(*args):
        raise RuntimeError("")  # an exception with an empty message, too
    monkeypatch.setattr(pytorch, "compiled", broken)
    records = torch_infer.main(["--model", str(tiny_models / "checkpoint.pt"), "--data-dir", mnist_dir,
                                "--device", "cpu", "--test-limit", "50", "--latency-runs", "5", "--quiet"])
    out = capsys.readouterr().out
    assert "skipped PyTorch torch.compile (inductor) on CPU: it could not be built here (RuntimeError)" in out
    assert "skipped PyTorch custom op: fused MoE, INT8 on CPU" in out  # the tiny model's EMB_SIZE 16
    assert {r["backend"].split(" on ")[0] for r in records} == {"PyTorch eager", "PyTorch TorchScript (frozen)"}
    with pytest.raises(UserError, match="--variant compile on cpu: RuntimeError"):
        torch_infer.main(["--model", str(tiny_models / "checkpoint.pt"), "--data-dir", mnist_dir,
                          "--device", "cpu", "--variant", "compile", "--test-limit", "50", "--quiet"])


BLOCKED = "import runpy, sys; sys.modules[{module!r}] = None; sys.argv = {argv!r}; sys.path.insert(0, {root!r}); " \
          "runpy.run_path({script!r}, run_name='__main__')"


@pytest.mark.parametrize("module, script, args, expected", [
    ("mlperf_loadgen", "loadgen.py", [], "loadgen.py needs the Python module mlperf_loadgen"),
    ("ray", "serve.py", ["--ray", "--port", "0"], "serve.py --ray needs the Python module ray.serve"),
    ("uvicorn", "serve.py", ["--port", "0"], "serve.py needs the Python module uvicorn"),
    ("netron", "export_onnx.py", ["--netron", "--no-browser", "--routing", "dense"], "--netron needs the Python "
                                                                                      "module netron"),
])
def test_a_missing_optional_module_is_one_line(tiny_models, mnist_dir, tmp_path, module, script, args, expected):
    argv = [script, *args, "--data-dir", mnist_dir]
    if script == "export_onnx.py":
        argv += ["--checkpoint", str(tiny_models / "checkpoint.pt"), "--output", str(tmp_path / "m.onnx"),
                 "--test-limit", "50"]
    if script == "serve.py":
        argv = [script, *args, "--model", str(tiny_models / "model.onnx")]
    code = BLOCKED.format(module=module, argv=argv, root=ROOT, script=os.path.join(ROOT, script))
    line = one_line_error(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                         timeout=300))
    assert expected in line and "pip install -r requirements.txt" in line, line


@pytest.mark.parametrize("error, expected", [
    (RuntimeError(""), "RuntimeError"), (ValueError("\n\n  first\nsecond"), "ValueError: first"),
    (UserError("already a user's line"), "already a user's line"), (OSError(), "OSError")])
def test_error_line_is_one_line_for_any_exception(error, expected):
    assert error_line(error) == expected


def test_a_report_folder_is_replaced_whole_or_not_at_all(tmp_path):
    from moebench.cli import atomic_folder
    logs = tmp_path / "loadgen"
    (logs / "old-run").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with atomic_folder(logs) as folder:
            (tmp_path / folder / "half").mkdir()
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in logs.iterdir()) == ["old-run"]
    with atomic_folder(logs) as folder:
        (tmp_path / folder / "new-run").mkdir()
    assert sorted(p.name for p in logs.iterdir()) == ["new-run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loadgen"]  # no temporary folder left
