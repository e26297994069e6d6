"""The repository's shape: entry scripts at the top, the library in moebench/ grouped in subpackages
named for what they hold, the model's own files below both; imports point one way; library functions
take plain values; no file grows past what one reads top to bottom; a Ray worker that gets only the
package can serve."""
import ast
import glob
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT
from data import load_split
from moebench.measuring import clock
from moebench.runners import onnx_runtime, registry

MODEL_FILES = {"config", "moe", "data"}  # the model's own files: structure, network, data reader
ENTRY_SCRIPTS = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))} - MODEL_FILES
PACKAGE = "moebench"
MAX_LINES = 350
MAX_TOP_MODULES = 16  # modules directly in moebench/; the rest live in subpackages
SUBPACKAGES = {"measuring", "reports", "runners", "serving"}
FLAG_READERS = {"from_flags", "asked"}  # the only library functions that read an argparse Namespace


def imported_modules(path):
    """The top-level names of every module a file imports, anywhere in it (relative ones as '.')."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def python_files(folder, recursive=False):
    return sorted(glob.glob(os.path.join(ROOT, folder, "**" if recursive else "", "*.py"), recursive=recursive))


def test_there_are_entry_scripts_and_model_files_to_check():
    assert {"train", "export_onnx", "benchmark", "serve", "torch_infer"} <= ENTRY_SCRIPTS
    assert all(os.path.isfile(os.path.join(ROOT, f"{name}.py")) for name in MODEL_FILES)


@pytest.mark.parametrize("path", python_files(""), ids=os.path.basename)
def test_no_entry_script_imports_another_and_model_files_import_no_package(path):
    name = os.path.basename(path)[:-3]
    imported = imported_modules(path)
    assert not imported & (ENTRY_SCRIPTS - {name}), f"{name}.py imports an entry script"
    if name in MODEL_FILES:
        assert PACKAGE not in imported, f"{name}.py (a model file) imports {PACKAGE}"


@pytest.mark.parametrize("path", python_files(""), ids=os.path.basename)
def test_every_script_says_what_it_does_in_its_help(path):
    with open(path) as f:
        assert ast.get_docstring(ast.parse(f.read())), f"{os.path.basename(path)} has no docstring: its --help is bare"


@pytest.mark.parametrize("path", python_files(PACKAGE, recursive=True), ids=lambda p: os.path.relpath(p, ROOT))
def test_the_package_imports_no_entry_script(path):
    assert not imported_modules(path) & ENTRY_SCRIPTS


def test_the_library_is_grouped_in_subpackages_that_say_what_they_hold():
    top = [p for p in python_files(PACKAGE) if os.path.basename(p) != "__init__.py"]
    assert len(top) <= MAX_TOP_MODULES, sorted(os.path.basename(p) for p in top)
    folders = {os.path.basename(os.path.dirname(p)) for p in python_files(PACKAGE, recursive=True)} - {PACKAGE}
    assert folders == SUBPACKAGES
    for folder in folders:
        with open(os.path.join(ROOT, PACKAGE, folder, "__init__.py")) as f:
            assert ast.get_docstring(ast.parse(f.read())), f"{folder}/__init__.py says nothing of what it holds"


@pytest.mark.parametrize("path", python_files(PACKAGE, recursive=True), ids=lambda p: os.path.relpath(p, ROOT))
def test_library_functions_take_plain_values_not_the_scripts_flags(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    takes_flags = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and "args" in [a.arg for a in node.args.args] and node.name not in FLAG_READERS]
    assert not takes_flags, f"{takes_flags} take the scripts' argparse Namespace"


def test_the_runner_modules_import_nothing_from_the_top_level():
    for path in python_files(os.path.join(PACKAGE, "runners")):
        # the registry and its Sources make runners from the checkpoint, so they read config.py and data.py
        if os.path.basename(path) not in ("registry.py", "sources.py"):
            assert not imported_modules(path) & (MODEL_FILES | ENTRY_SCRIPTS), path


def test_every_file_reads_top_to_bottom():
    files = python_files("") + python_files(PACKAGE, recursive=True) + python_files("tests")
    long = {os.path.relpath(p, ROOT): n for p in files if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_a_ray_worker_with_only_the_package_serves_and_says_what_ran(tiny_models, mnist_dir, tmp_path):
    """What serve.py ships to every node (py_modules): the package alone, run where the repository's
    own files are not importable."""
    shutil.copytree(os.path.join(ROOT, PACKAGE), tmp_path / PACKAGE)
    images = load_split("test", mnist_dir, 20)[0].numpy()
    pixels = np.round(images * 255).astype(np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    shutil.copy(tiny_models / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "served.pickle").write_bytes(pickle.dumps(registry.servable()["onnxruntime"]))  # what Ray sends
    program = ("import json, pickle, sys, numpy as np; from moebench.serving.engine import Engine; "
               "engine = Engine(pickle.load(open('served.pickle', 'rb')), open('model.onnx', 'rb').read(), threads=1); "
               "assert 'config' not in sys.modules and 'data' not in sys.modules; "
               "print(json.dumps({'described': engine.describe(), "
               "'classes': [a['class'] for a in engine.classify(np.load('pixels.npy').astype(np.float32).reshape(-1, 1, 28, 28) / 255)]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    answer = json.loads(found.stdout)
    expected = onnx_runtime.runner(str(tiny_models / "model.onnx")).logits(images).argmax(1)
    assert answer["classes"] == expected.tolist()
    assert answer["described"]["provider"] == "CPUExecutionProvider" and answer["described"]["threads"] == 1
    assert answer["described"]["engine"].startswith("ONNX Runtime ")


def doc_code_blocks(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)


def test_the_documented_way_to_add_a_backend_works(tiny_models, mnist_dir, tmp_path):
    """docs/adding-a-backend.md's runner and entry, run as written: the entry's runner answers as ONNX
    Runtime does, holds its engine, is timed by its clock, and lets its engine go on close()."""
    runner_code, entry_code = doc_code_blocks("adding-a-backend.md")[:2]
    module = types.ModuleType("moebench.runners.onnx_reference")
    exec(runner_code.replace("from .. import", "from moebench import").replace("from .base", "from moebench.runners.base"),
         module.__dict__)
    entry = eval(entry_code, {"Entry": registry.Entry, "onnx_reference": module})
    assert entry.key == "onnx-reference-dense" and entry.key not in {e.key for e in registry.catalogue()}
    images = load_split("test", mnist_dir, 50)[0].numpy()
    sources = registry.Sources(None, str(tmp_path), onnx_files={"dense": str(tiny_models / "model.onnx")})
    expected = onnx_runtime.runner(str(tiny_models / "model.onnx")).predict(images)
    with entry.runner(sources) as made:
        assert made.engine is not None and made.describe()["engine"].startswith("onnx ")
        logits, gates = made.predict(images)
        np.testing.assert_allclose(logits, expected[0], atol=1e-4)
        np.testing.assert_allclose(gates, expected[1], atol=1e-5)
        np.testing.assert_array_equal(clock.full_pass(made.clock(), images, 16).argmax(1), expected[0].argmax(1))
    assert made.engine is None and not made.clocks
