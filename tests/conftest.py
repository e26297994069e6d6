import gzip
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
import data  # noqa: E402
from moebench.serving.server_process import free_port  # noqa: E402,F401  (the tests' servers get ports as loadgen's do)

# Real MNIST, fetched once by data.py's own acquisition if it is not there yet.
MNIST_DIR = os.environ.get("MNIST_DIR", os.path.join(ROOT, "data"))


@pytest.fixture(scope="session")
def mnist_dir():
    data.load_split("test", MNIST_DIR, limit=1)
    return MNIST_DIR


@pytest.fixture
def tiny_structure():
    return {**config.defaults(), "EXPERTS": 4, "TOP": 2, "EMB_SIZE": 16, "HIDDEN_SIZE": 32}


def train_tiny(folder, mnist_dir, *extra, name="checkpoint.pt", train_images=3000, test_images=300,
               epochs=2, experts=4, size=32, hidden=None):
    """train.py on a small MNIST subset with a small model, on one thread; returns its history. One
    thread, since the background smoke run shares the cores: two training threads wait for each
    other at every step whenever one of them is descheduled, which makes training several times
    slower than on one."""
    import torch
    import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_on(train, folder, mnist_dir, extra, name, train_images, test_images, epochs, experts, size,
                        hidden)
    finally:
        torch.set_num_threads(threads)


def train_on(train, folder, mnist_dir, extra, name, train_images, test_images, epochs, experts, size, hidden):
    return train.main(["--data-dir", mnist_dir, "--train-limit", str(train_images), "--test-limit", str(test_images),
                       "--epochs", str(epochs), "--experts", str(experts), "--top", "2", "--emb-size", str(size),
                       "--hidden-size", str(hidden or size), "--quiet", "--checkpoint", str(folder / name),
                       "--scripted", str(folder / "model.pt"), "--plot", str(folder / "training.png"), *extra])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, mnist_dir):
    """A tiny trained model shared by the test modules that only read it: its folder holds
    checkpoint.pt, model.onnx (dense) and model.loop.onnx."""
    import export_onnx
    folder = tmp_path_factory.mktemp("tiny-shared")
    train_tiny(folder, mnist_dir)
    for routing, name in (("dense", "model.onnx"), ("loop", "model.loop.onnx")):
        export_onnx.main(["--checkpoint", str(folder / "checkpoint.pt"), "--routing", routing,
                          "--output", str(folder / name), "--data-dir", mnist_dir, "--test-limit", "300"])
    return folder


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory, tiny_models):
    """The shared tiny model in a folder of the test module's own, for tests that write beside it."""
    folder = tmp_path_factory.mktemp("tiny-copy") / "tiny"
    shutil.copytree(tiny_models, folder)
    return folder


@pytest.fixture(scope="session")
def small_models(tmp_path_factory, mnist_dir):
    """A small model trained well enough that its answers mean something (60k images, 2 epochs,
    EMB_SIZE and HIDDEN_SIZE 64, which the fused kernel takes): for the tests that hold a faster
    path to the fp32 model's answers. Its folder holds checkpoint.pt, model.onnx, model.loop.onnx."""
    import export_onnx
    folder = tmp_path_factory.mktemp("small-shared")
    train_tiny(folder, mnist_dir, train_images=60000, test_images=500, epochs=2, experts=4, size=64)
    for routing, name in (("dense", "model.onnx"), ("loop", "model.loop.onnx")):
        export_onnx.main(["--checkpoint", str(folder / "checkpoint.pt"), "--routing", routing,
                          "--output", str(folder / name), "--data-dir", mnist_dir, "--test-limit", "300"])
    return folder


USER_FILES = ("checkpoint.pt", "model.pt", "model.onnx", "model.loop.onnx", "training.png")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def repository_copy(folder):
    """The repository's own files (tracked, or new and not ignored), as a fresh clone has them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    return folder


class SmokeRun:
    """run_all.sh --quick end to end (every script, in this environment: a missing dependency fails
    it), in a copy of the repository whose root holds a user's trained files. It is the longest test
    and no test holds its timings to a figure, so it starts in the background as soon as the tests are
    collected, and the other tests run beside it on the machine's other core; the tests that read it
    run last (pytest_collection_modifyitems), so that it never holds one up while another could run.
    Not at a lower priority: LoadGen's latency ladder in it needs its share of a core."""

    def __init__(self, folder):
        data.load_split("test", MNIST_DIR, limit=1)  # fetched once, before anything reads it
        self.repo = repository_copy(folder / "repo")
        for name in USER_FILES:
            (self.repo / name).write_bytes(os.urandom(64) + name.encode())
        kept = USER_FILES + tuple(str(p.relative_to(self.repo)) for p in (self.repo / "results").rglob("*")
                                  if p.is_file())
        self.before = {name: sha256(self.repo / name) for name in kept}
        self.log = open(folder / "smoke.log", "w+")
        self.process = subprocess.Popen(["bash", "run_all.sh", "--quick"], cwd=self.repo,
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                        env={**os.environ, "MNIST_DIR": MNIST_DIR})

    def finished(self, timeout=1500):
        """(exit status, the run's output)."""
        code = self.process.wait(timeout)
        self.log.seek(0)
        return code, self.log.read()


SMOKE = {}


def reads_the_smoke_run(item):
    return bool({"smoke_run", "smoke_results"} & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(items):
    """The tests that wait for the smoke run go last, so that every other test runs while it does."""
    items.sort(key=reads_the_smoke_run)  # stable: the rest keep their order


def pytest_collection_finish(session):
    if any(map(reads_the_smoke_run, session.items)):
        SMOKE["run"] = SmokeRun(pathlib.Path(tempfile.mkdtemp(prefix="smoke-")))


def pytest_sessionfinish(session):
    run = SMOKE.pop("run", None)
    if run:
        if run.process.poll() is None:  # the session ended early: the run and every process it started
            os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()
        run.log.close()
        shutil.rmtree(run.repo.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_run():
    """The smoke run, waited for: (its exit status and output, the copy it ran in, {file: sha256} of
    the user's files and results/ before it); the tests of the benchmark's, the sweep's and loadgen's
    reports read what it wrote."""
    run = SMOKE["run"]
    return run.finished(), run.repo, run.before


@pytest.fixture(scope="session")
def smoke_results(smoke_run):
    """The smoke run's report folder (results/quick in its copy), once the run has passed."""
    (code, output), repo, _ = smoke_run
    assert code == 0, output[-6000:]
    return repo / "results" / "quick"


def run_script(*args, env=None):
    """A repository script run as a user runs it, from the repository's root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def run_scripts(*commands):
    """run_script(*command) for each command, two at a time (each is mostly one process's imports,
    on one core): their results, in order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: run_script(*command), commands))


def one_line_error(result):
    """The one line a script printed on stderr as it failed, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def without_gpus(env=None):
    """An environment for a subprocess that sees no GPU, on any machine: what a test of the 'no GPU
    here' path needs, instead of assuming the machine has none."""
    return {**(env or os.environ), "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


SERVED_IMAGES = 200


def get(url, timeout=30):
    """(status, parsed JSON) of one GET."""
    return post(url, None, timeout=timeout)


def post(url, body, content_type="application/octet-stream", timeout=30):
    """(status, parsed JSON) of one POST (a GET where body is None)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except ValueError:  # Ray Serve's own refusals are plain text
            return error.code, {"error": text.decode(errors="replace")}


@pytest.fixture(scope="module")
def served_images(mnist_dir):
    """The serving tests' images as a client sends them (uint8), and their labels."""
    images, labels = data.load_split("test", mnist_dir, SERVED_IMAGES)
    return np.round(images.numpy()[:, 0] * 255).astype(np.uint8), labels.numpy()


@pytest.fixture(scope="module")
def served_expected(tiny_models, served_images):
    """What ONNX Runtime itself says for the same uint8 pixels: (logits, gates)."""
    from moebench.runners import onnx_runtime
    session = onnx_runtime.create_session(str(tiny_models / "model.onnx"), ["CPUExecutionProvider"])
    pixels = (served_images[0].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    return session.run(["logits", "gates"], {"pixels": pixels})


BODY_TIMEOUT_S = 2
SERVERS = {"embedded": ["--max-batch-size", "8", "--max-queued", "2", "--body-timeout-s", str(BODY_TIMEOUT_S)],
           "ray": ["--ray", "--max-batch-size", "8", "--max-queued", "2", "--body-timeout-s", str(BODY_TIMEOUT_S)]}


def started_server(kind, tiny_models):
    """serve.py started as a user starts it: (process, url, port)."""
    from moebench.serving.server_process import ServerProcess
    port = free_port()
    started = ServerProcess([sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"), "--port", str(port),
                             "--threads", "1", "--max-request-images", "500", *SERVERS[kind]], ROOT, port)
    return started, started.url, port


@pytest.fixture(scope="session", params=list(SERVERS))
def server(request, tiny_models):
    """Each of the two servers in turn, shared by every test that only sends it requests (pytest runs
    all of one server's tests before it starts the next)."""
    started = started_server(request.param, tiny_models)
    yield started
    started[0].stop()  # Ctrl-C, as a user stops it: a killed Ray server would leave HAProxy and Ray's agents behind


@pytest.fixture(params=list(SERVERS))
def own_server(request, tiny_models):
    """Each of the two servers, started for one test that kills its processes or stops it:
    (process, url, port, kind)."""
    started = started_server(request.param, tiny_models)
    yield (*started, request.param)
    started[0].stop()


def check_answers(predictions, expected, rows):
    logits, gates = expected
    for answer, row in zip(predictions, rows):
        assert answer["class"] == int(logits[row].argmax())
        np.testing.assert_allclose(answer["logits"], logits[row], atol=1e-4)
        chosen = {e["expert"]: e["weight"] for e in answer["experts"]}
        assert set(chosen) == set(np.flatnonzero(gates[row]).tolist())
        assert all(abs(w - gates[row][e]) < 1e-4 for e, w in chosen.items())


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder, n_train=20, n_test=10, compress=False, seed=0):
    """Four small synthetic IDX files in MNIST's layout and names; returns the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            name = f"{split}-{kind}-ubyte"
            payload = idx_bytes(array, magic)
            if compress:
                name, payload = name + ".gz", gzip.compress(payload)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(payload)
            arrays[f"{split}-{kind}"] = array
    return arrays



def _forbid_skip(report):
    """CI sets FORBID_SKIPS=1: a skip there means something CI should have installed is missing,
    so it counts as a failure instead of passing quietly."""
    if report.skipped and os.environ.get("FORBID_SKIPS") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped, and FORBID_SKIPS=1 forbids skips: {report.longrepr}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _forbid_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _forbid_skip((yield))
