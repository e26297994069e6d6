"""serve.py --triton: Triton Inference Server, the `tritonserver` binary that the nvidia-pytriton
wheel carries, serving the model with its python backend running ONNX Runtime (the wheel has no
ONNX Runtime backend). A model repository and a backend folder are written in a scratch folder,
removed at the end; Triton's dynamic batcher and instance count take serve.py's flags; HTTP
only (the Open Inference Protocol), on loopback by default, with gRPC off and Triton's own Prometheus
metrics on the HTTP port + 2 (8002 beside 8000, as Triton's defaults). Ctrl-C stops Triton and
leaves no process."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

from ..cli import UserError
from . import kserve
from .server_process import end_with_parent

INSTALL = ("pip install --no-deps nvidia-pytriton==0.7.0 (requirements-nodeps.txt: the wheel pins numpy<2, and "
           "its python backend works with numpy 2)")
MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_model.py")
READY_TIMEOUT_S = 120


def distribution():
    """(the wheel's tritonserver folder, its bundled libraries folder), without importing pytriton
    (whose own imports need packages the server does not)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"serve.py --triton needs Triton Inference Server's binary: {INSTALL}")
    package = spec.submodule_search_locations[0]
    server = os.path.join(package, "tritonserver")
    if not os.path.isfile(os.path.join(server, "bin", "tritonserver")):
        raise UserError(f"{server} has no bin/tritonserver; reinstall: {INSTALL}")
    return server, os.path.join(os.path.dirname(package), "nvidia_pytriton.libs")


def model_config(experts, settings):
    """config.pbtxt: the model's contract, and Triton's batching, instances and queue from the flags."""
    return "\n".join([
        f'name: "{kserve.MODEL}"', 'backend: "python"', f"max_batch_size: {settings['max_batch_size']}",
        'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] } ]',
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }, '
        f'{{ name: "gates" data_type: TYPE_FP32 dims: [ {experts} ] }} ]',
        f"instance_group [ {{ count: {settings['instances']} kind: KIND_CPU }} ]",
        # no default_queue_policy { max_queue_size }: with one, Triton's throughput collapsed under
        # load (docs/serving.md), so its queue is unbounded
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(settings['batch_wait_ms'] * 1000)} }}", ""])


def write_repository(folder, model_bytes, experts, settings):
    version = os.path.join(folder, "models", kserve.MODEL, kserve.VERSION)
    os.makedirs(version)
    with open(os.path.join(folder, "models", kserve.MODEL, "config.pbtxt"), "w") as f:
        f.write(model_config(experts, settings))
    with open(os.path.join(version, "model.onnx"), "wb") as f:
        f.write(model_bytes)
    with open(os.path.join(version, "settings.json"), "w") as f:
        json.dump({"threads": settings["threads"]}, f)
    shutil.copy(MODEL_FILE, os.path.join(version, "model.py"))
    return os.path.join(folder, "models")


def write_backends(folder, server):
    """The python backend with the stub built for this Python (the wheel carries one per version)."""
    backend = os.path.join(folder, "backends", "python")
    shutil.copytree(os.path.join(server, "backends", "python"), backend,
                    ignore=shutil.ignore_patterns("__pycache__"))
    stub = os.path.join(server, "python_backend_stubs", f"{sys.version_info[0]}.{sys.version_info[1]}",
                        "triton_python_backend_stub")
    if not os.path.isfile(stub):
        raise UserError(f"nvidia-pytriton has no python backend stub for Python {sys.version_info[0]}."
                        f"{sys.version_info[1]}; use Python 3.8-3.13")
    shutil.copy(stub, backend)
    return os.path.join(folder, "backends")


def environment(libraries):
    """The stub embeds Python: this interpreter's libpython, standard library and packages (numpy,
    ONNX Runtime), wherever they are installed (a virtualenv included). The embedded interpreter
    finds its packages from the first `python3` on PATH, not from PYTHONPATH alone: this
    interpreter's own folder goes first, as activating its virtualenv would."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (sysconfig.get_config_var("LIBDIR"), libraries,
                                                         env.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONHOME"] = sys.base_prefix
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    return env


METRICS_PORT_OFFSET = 2  # Triton's own defaults: HTTP 8000, gRPC 8001, metrics 8002


def command(server, models, backends, host, port, metrics_port):
    """tritonserver's command line; metrics_port None: no metrics."""
    metrics = (["--allow-metrics=true", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
                "--allow-cpu-metrics=true"] if metrics_port else ["--allow-metrics=false"])
    return [os.path.join(server, "bin", "tritonserver"), f"--model-repository={models}",
            f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={port}",
            "--allow-grpc=false", *metrics, "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
            "--strict-readiness=true", "--log-info=false", "--log-warning=false"]


def wait_ready(process, url, log):
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline and process.poll() is None:
        try:
            if urllib.request.urlopen(url + "v2/health/ready", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    log.seek(0)
    last = [line.strip() for line in log.read().splitlines() if line.strip()][-3:]
    raise UserError(f"tritonserver did not become ready (exit {process.poll()}): {' | '.join(last)}")


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # not SIGINT, which a shell's background job ignores, and so would Triton
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(model_bytes, experts, settings, host, port, announce, metrics_port=None):
    """Run Triton on the model until Ctrl-C or SIGTERM (blocks); announce(url) once it is ready;
    Triton's Prometheus metrics on metrics_port, unless it is None."""
    server, libraries = distribution()
    with tempfile.TemporaryDirectory(prefix="moe-triton-") as folder, open(os.path.join(folder, "log"), "w+") as log:
        models = write_repository(folder, model_bytes, experts, settings)
        backends = write_backends(folder, server)
        process = subprocess.Popen(command(server, models, backends, host, port, metrics_port), stdout=log,
                                   stderr=subprocess.STDOUT, env=environment(libraries), preexec_fn=end_with_parent)
        try:
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
            wait_ready(process, url, log)
            announce(url)
            while process.poll() is None:
                time.sleep(0.5)
            log.seek(0)
            raise UserError(f"tritonserver exited ({process.returncode}): {log.read().strip()[-300:]}")
        except KeyboardInterrupt:
            print("stopping ...", flush=True)
        finally:
            stop(process)
