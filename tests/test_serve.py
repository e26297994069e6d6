"""serve.py for real, both servers (the embedded default and --ray) started as a user starts them on
a free local port: answered over HTTP with test images and bad requests, overloaded, a worker or
replica killed under load, stopped with Ctrl-C; the batcher's fairness; LoadGen against them."""
import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

import loadgen
from conftest import (ROOT, SERVED_IMAGES as IMAGES, check_answers, free_port, one_line_error, post,
                      run_script)
from scraped import grown, scrape
from moebench import gc_settings
from moebench.measuring import wrk
from moebench.runners import onnx_runtime, registry
from moebench.test_set import load_test_set
from moebench.serving.server_process import ServerProcess



def test_raw_and_json_requests_get_what_onnxruntime_says(server, served_images, served_expected):
    _, url, _ = server
    status, answer = post(url, served_images[0].tobytes())
    assert status == 200 and len(answer["predictions"]) == IMAGES
    check_answers(answer["predictions"], served_expected, range(IMAGES))
    for images in ([served_images[0][5].reshape(784).tolist(), served_images[0][6].reshape(784).tolist()],
                   [served_images[0][5].tolist(), served_images[0][6].tolist()]):  # flat, or 28 rows of 28
        status, answer = post(url, json.dumps({"images": images}).encode(), "application/json")
        assert status == 200
        check_answers(answer["predictions"], served_expected, [5, 6])
    assert json.loads(urllib.request.urlopen(url, timeout=30).read())["backend"] == "onnxruntime"


@pytest.mark.parametrize("body, content_type, status, says", [
    (b"", "application/octet-stream", 400, "empty body"),
    (bytes(785), "application/octet-stream", 400, "not a whole number of 28x28"),
    (bytes(784 * 501), "application/octet-stream", 413, "501 images in one request; at most 500"),
    (b"{not json", "application/json", 400, "bad JSON"),
    (b'{"images": [[1, 2, 3]]}', "application/json", 400, "each must be 784 numbers or 28x28"),
    (json.dumps({"images": [[300] * 784]}).encode(), "application/json", 400, "from 0 to 255"),
    (b'{"pictures": []}', "application/json", 400, "non-empty list under"),
    (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "nested too deeply"),
    (b"[" * 50_000 + b"]" * 50_000, "application/json", 400, ""),
    (bytes([0xff, 0xfe, 0x00]) * 100, "application/json", 400, "bad JSON"),
])
def test_bad_requests_get_a_4xx_and_the_replica_lives_on(server, served_images, body, content_type, status, says):
    _, url, _ = server
    before = post(url, served_images[0][:1].tobytes())[1]["served_by"]
    got, answer = post(url, body, content_type)
    assert got == status and says in answer["error"], answer
    assert "\n" not in answer["error"]
    assert post(url, served_images[0][:1].tobytes())[1]["served_by"] == before


def test_overload_is_refused_with_503_and_every_answer_is_right(server, served_images, served_expected):
    import aiohttp
    _, url, _ = server
    rows = list(range(IMAGES)) * 2

    async def flood():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(rows))) as session:
            async def one(row):
                async with session.post(url, data=served_images[0][row].tobytes()) as response:
                    return row, response.status, await response.read()
            return await asyncio.gather(*[one(row) for row in rows])
    results = asyncio.run(flood())
    statuses = [status for _, status, _ in results]
    assert 503 in statuses and 200 in statuses, sorted(set(statuses))
    assert set(statuses) <= {200, 503}
    for row, status, body in results:
        if status == 200:
            check_answers(json.loads(body)["predictions"], served_expected, [row])


def background_wrk(url, body, folder, seconds):
    """wrk, the C client, posting `body` over 32 connections for `seconds` (None where it is missing)."""
    if not wrk.available():
        return None
    (folder / "body").write_bytes(body)
    (folder / "post.lua").write_text(wrk.script(str(folder / "body"), {"Content-Type": "application/octet-stream"}))
    return subprocess.Popen(["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(folder / "post.lua"), url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_workers_are_replaced_without_a_wrong_answer_and_ctrl_c_stops_the_server(own_server, served_images,
                                                                                        served_expected, tmp_path):
    """Four clients post images of their own rows, and check each answer against that row, while the
    process that serves them is killed under wrk's load too; a new one must take over. The default
    server's model computes in a process of its own beside each worker: killed under load, its worker
    ends too, and the new worker's model process answers. Then Ctrl-C under load ends the server
    cleanly."""
    started, url, _, kind = own_server
    killed_under_load(url, lambda worker: worker, served_images, served_expected, tmp_path)
    if kind == "embedded":
        killed = killed_under_load(url, model_process_of, served_images, served_expected, tmp_path)
        assert not running(killed["worker"])
    flood = background_wrk(url, served_images[0][:1].tobytes(), tmp_path, 30)  # Ctrl-C under load
    time.sleep(1)
    started.process.send_signal(signal.SIGINT)
    assert started.process.wait(60) == 0
    if flood:
        flood.kill()
        flood.wait()
    assert started.output().strip().endswith("stopped")
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def model_process_of(worker):
    """The model process a default-server worker started (its only child)."""
    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and parent_of(int(pid)) == worker]
    assert len(children) == 1, children
    return int(children[0])


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def killed_under_load(url, victim_of, served_images, served_expected, tmp_path):
    """Kill victim_of(the answering worker's pid) under wrk and four checking clients; returns the pids."""
    flood = background_wrk(url, served_images[0][:1].tobytes(), tmp_path, 8)
    worker = post(url, served_images[0][:1].tobytes())[1]["served_by"]["pid"]
    victim = victim_of(worker)
    stop, answered, failed, new_pid = threading.Event(), [], [], []

    def client(offset):
        row = offset
        while not stop.is_set():
            row = (row + 4) % IMAGES
            sizes = 1 + row % 3  # one, two or three images
            rows = [(row + k) % IMAGES for k in range(sizes)]
            try:
                status, answer = post(url, served_images[0][rows].tobytes(), timeout=10)
            except (OSError, ValueError):
                status, answer = None, {}
            if status != 200:
                failed.append(status)
                time.sleep(0.05)
                continue
            answered.append((rows, answer["predictions"]))
            if answer["served_by"]["pid"] != worker:
                new_pid.append(answer["served_by"]["pid"])
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 90  # until the new worker answers and enough answers were checked (wrk takes most)
    while time.time() < deadline and not (new_pid and len(answered) > 20):
        time.sleep(0.2)
    stop.set()
    for thread in clients:
        thread.join()
    if flood:
        flood.wait(60)
    assert new_pid, f"no new worker within 90 s ({len(failed)} failed requests)"
    assert len(answered) > 20
    for rows, predictions in answered:
        assert len(predictions) == len(rows)
        check_answers(predictions, served_expected, rows)
    return {"worker": worker, "victim": victim}


def test_a_big_request_and_small_ones_together_get_their_own_answers(server, served_images, served_expected):
    import aiohttp
    _, url, _ = server
    big = list(range(IMAGES)) * 2

    async def together():
        async with aiohttp.ClientSession() as session:
            async def one(rows):
                async with session.post(url, data=served_images[0][rows].tobytes()) as response:
                    return rows, response.status, await response.read()
            return await asyncio.gather(one(big), *[one([row]) for row in range(0, IMAGES, 20)])
    answered = 0
    for rows, status, body in asyncio.run(together()):
        if status == 503:  # the fixture's queue holds two requests; a refusal is allowed, a wrong answer never
            continue
        assert status == 200
        check_answers(json.loads(body)["predictions"], served_expected, rows)
        answered += 1
    assert answered >= 2  # the queue's two places at least


def test_metrics_count_the_requests_each_server_answered(server, served_images):
    """GET /metrics, from the default server's workers and from Ray Serve's replicas alike."""
    _, url, _ = server
    before = scrape(url)
    for row in range(5):
        assert post(url, served_images[0][row].tobytes())[0] == 200
    after = scrape(url)
    assert any(name.startswith("moe_model_call_seconds") for name, _ in after)
    assert grown(before, after, "moe_requests_total", route="/", status="200") == 5


def test_the_smoke_run_s_loadgen_report_has_every_scenario(smoke_results):
    """loadgen.py --quick as run_all.sh --quick ran it: the in-process reference in SingleStream,
    Offline and accuracy mode, the bare server as the ceiling, and serve.py under LoadGen and wrk."""
    report = json.loads((smoke_results / "loadgen.json").read_text())
    row = report["in_process"][registry.entry(registry.REFERENCE).label]
    assert row["key"] == registry.REFERENCE
    assert row["single_stream"]["p90_ns"] > 0 and row["offline"]["samples_per_s"] > 0
    assert row["loadgen"]["accuracy"] == pytest.approx(row["direct_accuracy"])
    served = report["server"][next(s.name for s in loadgen.SERVERS if not s.bare)]
    assert served["loadgen"]["accuracy"] == pytest.approx(served["direct_accuracy"])
    assert served["ladder"]["steps"] and report["server"][loadgen.BASELINE]["ladder"]["steps"]
    ceiling = report["server"][report["ceiling"]]
    assert report["ceiling"] in {s.name for s in loadgen.SERVERS if s.bare} and ceiling["vs_ceiling"] == 1.0
    assert "loadgen" not in ceiling and report["loadgen_version"] not in ("", "unknown")
    logs = smoke_results / "loadgen" / loadgen.slug(registry.entry(registry.REFERENCE).label)
    for scenario in ("singlestream", "offline"):  # LoadGen gave its verdict; VALID is a timing verdict, which a
        # smoke run sharing the cores with the other tests may miss, so it is the main job's to show
        assert re.search(r"Result is : (IN)?VALID", (logs / scenario / "mlperf_log_summary.txt").read_text())
    for scenario in ("singlestream", "offline", "accuracy"):
        assert "test_mode" in (logs / scenario / "mlperf_log_detail.txt").read_text()
    assert (smoke_results / "loadgen.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Server" in (smoke_results / "loadgen.md").read_text()


def test_loadgen_measures_a_running_server_given_by_its_url(server, tiny_models, mnist_dir, tmp_path):
    """loadgen.py --server-url: the running server's answers checked in LoadGen's accuracy mode, one
    request at a time, and its Server ladder, as for a server loadgen.py starts itself."""
    _, url, _ = server
    args = loadgen.parse_args(["--quick", "--server-url", url, "--model", str(tiny_models / "model.onnx"),
                               "--data-dir", mnist_dir, "--test-limit", "600", "--out-dir", str(tmp_path)])
    images, labels = load_test_set(mnist_dir, 600)
    with onnx_runtime.runner(args.model) as reference:
        expected = reference.logits(images).argmax(1)
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    row = loadgen.server_row(loadgen.Server(f"serve.py at {url}"), args, pixels, labels, expected, str(tmp_path), url)
    assert row["loadgen"]["accuracy"] == pytest.approx(row["direct_accuracy"]) and row["loadgen"]["agreement"] == 100.0
    assert row["single_stream"]["p90_ns"] > 0 and row["ladder"]["steps"]
    if wrk.available():
        assert row["wrk"]


def test_the_load_generator_keeps_its_loaded_heap_out_of_the_collector_during_a_test():
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    with pytest.raises(RuntimeError):
        with gc_settings.settled():
            assert gc.get_freeze_count() > frozen  # what was loaded before the test is never scanned
            assert gc.get_threshold()[0] > threshold[0]
            raise RuntimeError("a test that fails")
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen


def test_a_taken_port_is_one_clear_line(server, tiny_models):
    _, _, port = server
    line = one_line_error(run_script("serve.py", "--model", str(tiny_models / "model.onnx"), "--port", str(port)))
    assert f"--port {port}: cannot listen there" in line


def test_refuses_a_model_without_gates_and_an_unreachable_cluster(tmp_path, tiny_models):
    import onnx
    model = onnx.load(str(tiny_models / "model.onnx"))
    del model.graph.output[1]
    onnx.save(model, str(tmp_path / "no-gates.onnx"))
    line = one_line_error(run_script("serve.py", "--model", str(tmp_path / "no-gates.onnx")))
    assert "has no 'gates' output" in line
    line = one_line_error(run_script("serve.py", "--model", str(tiny_models / "model.onnx"),
                                     "--address", f"127.0.0.1:{free_port()}"))
    assert "no Ray cluster answers there" in line


@pytest.mark.parametrize("backend, http_server", [("fused-int8", "uvicorn"), ("openvino", "granian")])
def test_the_fastest_engines_serve_their_own_answers_and_say_so(backend, http_server, small_models, served_images):
    """The embedded server with each other backend (and the other HTTP server): every answer is that
    engine's own (the same runner in this process), and GET and every answer say which backend,
    engine and server served it."""
    from moebench import checkpoint
    from moebench.runners import openvino_cpu, pytorch
    port = free_port()
    started = ServerProcess([sys.executable, "serve.py", "--backend", backend, "--model",
                             str(small_models / "model.onnx"), "--checkpoint", str(small_models / "checkpoint.pt"),
                             "--port", str(port), "--http-server", http_server], ROOT, port)
    try:
        pixels = (served_images[0].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
        if backend == "fused-int8":
            model, structure, _ = checkpoint.load_model(str(small_models / "checkpoint.pt"), {"ROUTING": "dense"})
            own = pytorch.runner("fused-int8", model, structure)
        else:
            own = openvino_cpu.runner(str(small_models / "model.onnx"))
        logits, gates = own.predict(pixels)
        about = json.loads(urllib.request.urlopen(started.url, timeout=30).read())
        assert about["backend"] == backend and about["engine"] == own.describe()["engine"]
        assert about["precision"] == own.describe()["precision"]
        assert backend != "openvino" or about["threads"] == 1  # serve.py's --threads default, as the engine says
        status, answer = post(started.url, served_images[0].tobytes())
        assert status == 200 and answer["served_by"]["backend"] == backend
        assert answer["served_by"]["server"] == http_server
        check_answers(answer["predictions"], (logits, gates), range(IMAGES))
        started.process.send_signal(signal.SIGINT)  # Ctrl-C exits 0 with every backend (docs/serving.md)
        assert started.process.wait(60) == 0
    finally:
        started.stop()


def test_ray_refuses_the_fused_operator_in_one_line(tiny_models):
    line = one_line_error(run_script("serve.py", "--ray", "--backend", "fused-int8", "--model",
                                     str(tiny_models / "model.onnx")))
    assert "--backend fused-int8 reads the checkpoint" in line and "without --ray" in line


def test_workers_end_with_a_killed_supervisor(tiny_models):
    """SIGKILL gives the supervisor no time to stop its workers: they and their model processes must
    end by themselves."""
    port = free_port()
    started = ServerProcess([sys.executable, "serve.py", "--model", str(tiny_models / "model.onnx"), "--port",
                             str(port), "--replicas", "2"], ROOT, port)
    workers = {json.loads(urllib.request.urlopen(started.url, timeout=30).read())["pid"] for _ in range(20)}
    processes = workers | {model_process_of(worker) for worker in workers}
    started.process.kill()
    started.process.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(running(pid) for pid in processes):
        time.sleep(0.2)
    started.stop()
    assert not [pid for pid in processes if running(pid)], processes


def running(pid):
    """Whether a process runs (an ended one that nobody has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
