"""The README's Ray cluster recipe run as two nodes: two network namespaces joined by a veth pair
stand for two machines (10.231.x.1, the head, and 10.231.x.2), each with its own `ray start`, under
Ray's token authentication; serve.py joins as the README says and answers from a replica on each
node. Everything is torn down afterwards, whatever happened."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT, one_line_error
from moebench.runners import onnx_runtime
from data import load_split

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
PORT, HTTP_PORT = 6379, 8124
CLIENT = """
import json, sys, urllib.request
pixels = open(sys.argv[1], "rb").read()
answers = []
for url in sys.argv[2:]:
    request = urllib.request.Request(url, data=pixels, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answers.append(json.loads(response.read()))
print(json.dumps(answers))
"""


def sh(*command, check=True, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def two_hosts():
    """(namespace, address) of two hosts on one veth link."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2's ip (network namespaces stand for the two hosts): run as root")
    tag = os.getpid() % 200 + 20
    hosts = [(f"moe-{tag}-{side}", f"10.231.{tag}.{n}") for n, side in ((1, "a"), (2, "b"))]
    link = [f"moe{tag}va", f"moe{tag}vb"]
    try:
        for namespace, _ in hosts:
            sh("ip", "netns", "add", namespace)
        sh("ip", "link", "add", link[0], "type", "veth", "peer", "name", link[1])
        for (namespace, address), device in zip(hosts, link):
            sh("ip", "link", "set", device, "netns", namespace)
            sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            sh("ip", "-n", namespace, "link", "set", device, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace, _ in hosts:
            stop_everything_on(namespace)
            sh("ip", "netns", "del", namespace, check=False)


def on(host, *command):
    """A command line run on that host."""
    return ["ip", "netns", "exec", host[0], *command]


def stop_everything_on(namespace):
    for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster(two_hosts):
    """A head on the first host and a worker node on the second, one CPU each, token auth on."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head, worker = two_hosts
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as head_dir, \
            tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as worker_dir:
        sh(*on(head, RAY, "start", "--head", "--node-ip-address", head[1], "--port", str(PORT),
               "--include-dashboard", "false", "--temp-dir", head_dir, *common), env=env)
        sh(*on(worker, RAY, "start", "--address", f"{head[1]}:{PORT}", "--node-ip-address", worker[1],
               "--temp-dir", worker_dir, *common), env=env)
        try:
            yield head, worker, env
        finally:
            for namespace, _ in two_hosts:
                stop_everything_on(namespace)


@pytest.fixture(scope="module")
def served(cluster, tiny_models):
    """serve.py on the head as the README says, --host 0.0.0.0 --replicas 2."""
    head, _, env = cluster
    process = subprocess.Popen(on(head, sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"),
                                  "--address", f"{head[1]}:{PORT}", "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                                  "--replicas", "2", "--cpus-per-replica", "1"),
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    if not first.startswith("serving "):
        process.kill()
        pytest.fail(f"serve.py did not start: {first} {process.stderr.read()[-2000:]}")
    yield process, first
    if process.poll() is None:
        process.kill()


def ask(host, env, pixels_file, urls):
    done = subprocess.run(on(host, sys.executable, "-c", CLIENT, str(pixels_file), *urls),
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_serve_on_two_nodes_answers_from_a_replica_on_each(served, cluster, tiny_models, mnist_dir, tmp_path):
    head, worker, env = cluster
    _, first_line = served
    assert f"at http://{head[1]}:{HTTP_PORT}/ (and port {HTTP_PORT} of every node)" in first_line
    images, _ = load_split("test", mnist_dir, 50)
    pixels = np.round(images.numpy()[:, 0] * 255).astype(np.uint8)
    (tmp_path / "pixels").write_bytes(pixels.tobytes())
    session = onnx_runtime.create_session(str(tiny_models / "model.onnx"), ["CPUExecutionProvider"])
    expected = session.run(["logits"], {"pixels": (pixels.astype(np.float32) / 255).reshape(-1, 1, 28, 28)})[0]
    answers = ask(head, env, tmp_path / "pixels", [f"http://{h[1]}:{HTTP_PORT}/" for h in (head, worker)])
    for answer in answers:
        assert [p["class"] for p in answer["predictions"]] == expected.argmax(1).tolist()
    # each node's HTTP proxy hands the request to the replica on its own node
    assert [a["served_by"]["node_ip"] for a in answers] == [head[1], worker[1]]
    assert answers[0]["served_by"]["node"] != answers[1]["served_by"]["node"]


def test_a_second_serve_with_other_http_settings_is_refused_not_announced(served, cluster, tiny_models, tmp_path):
    head, worker, env = cluster
    result = subprocess.run(on(head, sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"),
                               "--address", f"{head[1]}:{PORT}", "--port", str(HTTP_PORT + 1)),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    line = one_line_error(result)
    assert f"Ray Serve already runs on this cluster with its HTTP proxies on 0.0.0.0:{HTTP_PORT}" in line, line
    assert "serving" not in result.stdout
    # the refused one leaves the running application alone
    (tmp_path / "pixels").write_bytes(bytes(784))
    answers = ask(head, env, tmp_path / "pixels", [f"http://{h[1]}:{HTTP_PORT}/" for h in (head, worker)])
    assert [len(a["predictions"]) for a in answers] == [1, 1]


def test_a_join_refused_for_authentication_says_what_to_set(cluster, tiny_models):
    """Both refusals at once: each waits for Ray's own connection timeout, so they wait together."""
    head, _, env = cluster
    cases = {"refused this client's authentication (RAY_AUTH_MODE is not set)": {"RAY_AUTH_MODE": None},
             "refused this client's authentication (the token is not the cluster's)": {"RAY_AUTH_TOKEN": "0" * 64}}
    joins = {expected: subprocess.Popen(
        on(head, sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"), "--address",
           f"{head[1]}:{PORT}"),
        cwd=ROOT, env={k: v for k, v in {**env, **auth}.items() if v is not None}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for expected, auth in cases.items()}
    for expected, process in joins.items():
        out, err = process.communicate(timeout=180)
        line = one_line_error(subprocess.CompletedProcess(process.args, process.returncode, out, err))
        assert expected in line and "export RAY_AUTH_MODE=token" in line and "ray get-auth-token" in line, line


def test_ctrl_c_stops_serve_and_leaves_the_cluster_running(served, cluster):
    head, _, env = cluster
    process, _ = served
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip().endswith("stopped")
    status = sh(*on(head, RAY, "status", "--address", f"{head[1]}:{PORT}"), env=env)
    assert status.stdout.count("node_") == 2  # both nodes still there
