"""Training in several processes, on CPU with gloo and torchrun's 2 processes: data parallel and
expert parallel give the loss curve and weights of one process on the same global batch, also when
resumed, and from two nodes; the expert-parallel forward equals one process's on every row; a dying
rank or Ctrl-C ends the whole run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import export_onnx
import train
from moebench import checkpoint
from conftest import ROOT, free_port

SMALL = ["--train-limit", "512", "--test-limit", "200", "--experts", "4", "--top", "2", "--emb-size", "32",
         "--hidden-size", "32", "--noisy-gating", "off", "--quiet"]


def torchrun(*args, timeout=180, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


def train_args(folder, name, mnist_dir, *extra, epochs=2):
    return ["train.py", *SMALL, "--data-dir", mnist_dir, "--epochs", str(epochs), "--checkpoint", str(folder / name),
            "--scripted", str(folder / f"{name}.scripted"), "--plot", str(folder / f"{name}.png"), *extra]


def assert_same_training(a, b):
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["balance_loss"] == pytest.approx(y["balance_loss"], rel=1e-4, abs=1e-7)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("parallel")
    train.main(train_args(folder, "single.pt", mnist_dir)[1:])
    return folder, checkpoint.load(str(folder / "single.pt"))


@pytest.mark.parametrize("mode", ["data", "expert"])
def test_n_processes_train_as_one_process_and_resume_where_they_stopped(one_process, mnist_dir, mode):
    """Two epochs on 2 processes give one process's losses and weights on the same global batch; one
    epoch, then --resume for the second, gives the same again."""
    folder, single = one_process
    result = torchrun(*train_args(folder, f"{mode}.pt", mnist_dir, "--parallel", mode))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"2 processes, {mode} parallel" in result.stdout
    assert result.stdout.count("epoch  2/2") == 1  # only rank 0 prints
    parallel = checkpoint.load(str(folder / f"{mode}.pt"))
    assert parallel["parallel"] == {"mode": mode, "processes": 2}
    assert_same_training(parallel, single)
    if mode == "expert":
        assert "all_to_all" in result.stdout and "KiB/step" in result.stdout
    # an ordinary checkpoint: the later scripts take it as they are
    export_onnx.main(["--checkpoint", str(folder / f"{mode}.pt"), "--output", str(folder / f"{mode}.onnx"),
                      "--data-dir", mnist_dir, "--test-limit", "100"])
    first = torchrun(*train_args(folder, f"resumed-{mode}.pt", mnist_dir, "--parallel", mode, epochs=1))
    resumed = torchrun(*train_args(folder, f"resumed-{mode}.pt", mnist_dir, "--parallel", mode, "--resume"))
    for name, run in (("first epoch", first), ("resumed", resumed)):
        assert run.returncode == 0, f"{name} run failed: {run.stderr[-3000:]}"
    again = checkpoint.load(str(folder / f"resumed-{mode}.pt"))
    assert [h["epoch"] for h in again["history"]] == [1, 2]
    assert_same_training(again, parallel)


def test_expert_parallel_forward_equals_one_process_on_every_row(tiny_models, mnist_dir, tmp_path):
    out = tmp_path / "forward.json"
    result = torchrun("tests/parallel_forward.py", str(tiny_models / "checkpoint.pt"), mnist_dir, "301", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(out.read_text())
    assert found["rows"] == 301 and found["argmax_equal"] and found["gates_equal"]
    assert found["max_abs_diff"] <= 1e-5


def test_experts_that_do_not_divide_are_one_clear_error(tmp_path, mnist_dir):
    result = torchrun(*train_args(tmp_path, "odd.pt", mnist_dir, "--parallel", "expert", "--experts", "3"))
    assert result.returncode != 0
    assert result.stderr.count("error: --parallel expert shards 3 experts over 2 processes") == 1
    result = torchrun(*train_args(tmp_path, "none.pt", mnist_dir))
    assert result.returncode != 0 and "choose --parallel data or --parallel expert" in result.stderr


def long_run(tmp_path, mnist_dir, mode):
    """torchrun in its own process group (as a terminal would run it), training long enough to be stopped."""
    args = train_args(tmp_path, "long.pt", mnist_dir, "--parallel", mode, epochs=200)
    args[args.index("--train-limit") + 1] = "8000"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--standalone", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "long.pt").exists():
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.5)
    return process


def workers(launcher):
    found = subprocess.run(["pgrep", "-f", f"train.py.*{launcher}"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def test_a_dying_rank_ends_every_rank_without_a_hang(tmp_path, mnist_dir):
    process = long_run(tmp_path, mnist_dir, "expert")
    ranks = [pid for pid in workers(tmp_path / "long.pt") if pid != process.pid]
    assert len(ranks) >= 2
    os.kill(max(ranks), signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "lost contact with another process" in err or "stopped by torchrun" in err
    assert not workers(tmp_path / "long.pt")
    assert checkpoint.load(str(tmp_path / "long.pt"))["epoch"] >= 1  # whole, never half-written


def test_ctrl_c_stops_every_rank(tmp_path, mnist_dir):
    process = long_run(tmp_path, mnist_dir, "data")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and err.count("interrupted") == 1
    assert not workers(tmp_path / "long.pt")
    assert checkpoint.load(str(tmp_path / "long.pt"))["epoch"] >= 1


def test_the_readme_s_two_node_recipe_trains_as_one_process(one_process, mnist_dir):
    """Two torchrun commands, node ranks 0 and 1, one process each, meeting at a c10d rendezvous
    (README) instead of one --standalone launcher: what the one-node runs do not show is that the
    ranks find each other through the rendezvous, and that only node 0 reports. Expert parallel,
    whose all_to_all crosses the nodes. On loopback here: --local-addr and GLOO_SOCKET_IFNAME keep
    every connection on lo."""
    folder, single = one_process
    mode = "expert"
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", f"moe-{mode}", "--local-addr", "127.0.0.1",
                               *train_args(folder, f"two-nodes-{mode}.pt", mnist_dir, "--parallel", mode)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert f"2 processes, {mode} parallel" in outputs[0][0] and "epoch  2/2" in outputs[0][0]
    assert "epoch" not in outputs[1][0]  # node 1 trains, node 0 reports
    parallel = checkpoint.load(str(folder / f"two-nodes-{mode}.pt"))
    assert parallel["parallel"] == {"mode": mode, "processes": 2}
    assert_same_training(parallel, single)
