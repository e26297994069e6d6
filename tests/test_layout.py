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
import moebench.runners
from moebench.measuring import clock
from moebench.measuring.compare import accuracy
from moebench.runners import onnx_runtime, registry
from moebench.runners.served import BACKENDS

MODEL_FILES = {"config", "moe", "data"}  # the model's own files: structure, network, data reader
ENTRY_SCRIPTS = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))} - MODEL_FILES
PACKAGE = "moebench"
MAX_LINES = 350
MAX_FUNCTION_LINES = 60
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


def library_calls_given_the_flags(tree):
    """Calls of a moebench function that are handed the script's argparse Namespace (whatever its
    name: each variable assigned from parse_args(), or a script function's parameter it is passed
    to), other than the FLAG_READERS."""
    library = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith(PACKAGE) for alias in node.names}
    namespaces = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and isinstance(node.value, ast.Call) and "parse_args" in ast.unparse(node.value.func)
                  for target in node.targets if isinstance(target, ast.Name)}
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for _ in range(3):  # a Namespace handed on to the script's own functions, under their parameter's name
        for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]:
            target = functions.get(call.func.id)
            for i, arg in enumerate(call.args):
                if target and isinstance(arg, ast.Name) and arg.id in namespaces and i < len(target.args.args):
                    namespaces.add(target.args.args[i].arg)
    found = []
    for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
        root = call.func
        while isinstance(root, ast.Attribute):
            root = root.value
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        handed = [a for a in call.args + [k.value for k in call.keywords] if isinstance(a, ast.Name)
                  and a.id in namespaces]
        if isinstance(root, ast.Name) and root.id in library and handed and name not in FLAG_READERS:
            found.append(ast.unparse(call.func))
    return found


@pytest.mark.parametrize("name", sorted(ENTRY_SCRIPTS))
def test_library_functions_take_plain_values_not_the_scripts_flags(name):
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        calls = library_calls_given_the_flags(ast.parse(f.read()))
    assert not calls, f"{name}.py hands its argparse Namespace to {calls}; pass the values they need"


def test_the_flags_check_finds_a_namespace_under_any_name():
    script = ("from moebench import block\nfrom moebench.x import helper\n"
              "def inner(flags):\n    return helper.use(flags)\n"
              "def main():\n    options = parser.parse_args()\n    block.Settings.from_flags(options)\n"
              "    inner(options)\n    block.show(options.quiet)\n")
    assert library_calls_given_the_flags(ast.parse(script)) == ["helper.use"]


def test_the_runner_modules_import_nothing_from_the_top_level():
    for path in python_files(os.path.join(PACKAGE, "runners")):
        # the registry and its Sources make runners from the checkpoint, so they read config.py and data.py
        if os.path.basename(path) not in ("registry.py", "sources.py"):
            assert not imported_modules(path) & (MODEL_FILES | ENTRY_SCRIPTS), path


def test_every_file_and_function_reads_top_to_bottom():
    files = python_files("") + python_files(PACKAGE, recursive=True) + python_files("tests")
    long = {os.path.relpath(p, ROOT): n for p in files if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
    functions = {}
    for path in python_files("") + python_files(PACKAGE, recursive=True):
        with open(path) as f:
            functions.update({f"{os.path.relpath(path, ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
                              for node in ast.walk(ast.parse(f.read()))
                              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))})
    long = {name: n for name, n in functions.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_a_ray_worker_with_only_the_package_serves_and_says_what_ran(tiny_models, mnist_dir, tmp_path):
    """What serve.py ships to every node (py_modules): the package alone, run where the repository's
    own files are not importable."""
    shutil.copytree(os.path.join(ROOT, PACKAGE), tmp_path / PACKAGE)
    images = load_split("test", mnist_dir, 20)[0].numpy()
    pixels = np.round(images * 255).astype(np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    shutil.copy(tiny_models / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "served.pickle").write_bytes(pickle.dumps(BACKENDS["onnxruntime"]))  # what Ray sends
    program = ("import json, pickle, sys, numpy as np; from moebench.serving.engine import Engine; "
               "engine = Engine(pickle.load(open('served.pickle', 'rb')), open('model.onnx', 'rb').read(), threads=1); "
               "assert not {'config', 'data', 'torch', 'openvino'} & set(sys.modules), sorted(sys.modules); "
               "print(json.dumps({'described': engine.describe(), "
               "'classes': engine.compute(np.load('pixels.npy').astype(np.float32).reshape(-1, 1, 28, 28) / 255)"
               "[0].argmax(1).tolist()}))")
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


def test_serve_py_imports_only_the_backend_it_serves():
    """serve.py lists its backends without importing them: no torch, OpenVINO or compiler behind it."""
    program = "import sys, serve; print(sorted({'torch', 'openvino', 'tvm', 'MNN'} & set(sys.modules)))"
    found = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_documented_way_to_add_a_backend_works(tiny_models, mnist_dir, tmp_path, monkeypatch):
    """docs/adding-a-backend.md's runner, entry and script, run as written: the entry's runner answers
    as ONNX Runtime does, holds its engine, is timed by its clock, and lets its engine go on close();
    the script prints its block with the runner's name and the accuracy of those answers."""
    runner_code, entry_code, script_code = doc_code_blocks("adding-a-backend.md")[:3]
    module = types.ModuleType("moebench.runners.onnx_reference")
    exec(runner_code.replace("from .. import", "from moebench import").replace("from .base", "from moebench.runners.base"),
         module.__dict__)
    entry = eval(entry_code, {"Entry": registry.Entry, "onnx_reference": module})
    assert entry.key == "onnx-reference-dense" and entry.key not in {e.key for e in registry.catalogue()}
    images = load_split("test", mnist_dir, 50)[0].numpy()
    sources = registry.Sources(None, str(tmp_path), onnx_files={"dense": str(tiny_models / "model.onnx")})
    expected = onnx_runtime.runner(str(tiny_models / "model.onnx")).predict(images)
    with entry.make(sources) as made:
        assert made.engine is not None and made.describe()["engine"].startswith("onnx ")
        logits, gates = made.predict(images)
        np.testing.assert_allclose(logits, expected[0], atol=1e-4)
        np.testing.assert_allclose(gates, expected[1], atol=1e-5)
        np.testing.assert_array_equal(clock.full_pass(made.clock(), images, 16).argmax(1), expected[0].argmax(1))
    assert made.engine is None and not made.clocks
    monkeypatch.setitem(sys.modules, "moebench.runners.onnx_reference", module)
    monkeypatch.setattr(moebench.runners, "onnx_reference", module, raising=False)
    script = types.ModuleType("onnx_reference_infer")
    exec(script_code, script.__dict__)
    record, = script.main(["--model", str(tiny_models / "model.onnx"), "--data-dir", mnist_dir, "--test-limit", "20",
                           "--batch-size", "10", "--latency-runs", "5", "--quiet"])
    assert record["backend"] == "ONNX reference evaluator" and record["images"] == 20
    assert record["accuracy"] == pytest.approx(accuracy(expected[0][:20], load_split("test", mnist_dir, 20)[1]))
