"""Serve an exported model over HTTP. By default on this machine: uvicorn worker processes, each with
the model in process behind a dynamic batcher, supervised so that a worker that dies is replaced.
With --ray (or --address): a Ray Serve application, replicas across processes and the nodes of a Ray
cluster, each serving the same application as a worker does, behind Ray Serve's HAProxy ingress on a
local cluster. With --triton: Triton Inference Server (the binary nvidia-pytriton carries), its python
backend running ONNX Runtime behind Triton's dynamic batcher.

POST / with raw uint8 pixels (784 bytes per 28x28 image, any number of images) or JSON
{"images": [[784 values 0-255], ...]} (28x28 nested lists work too); the answer is JSON with each
image's class, logits and chosen experts with their gate weights, and which server, process and
backend answered. GET / says what is served. The Open Inference Protocol (KServe v2, as Triton speaks
it) is served too: GET /v2/health/ready, GET /v2/models/moe, POST /v2/models/moe/infer with JSON
tensors or the binary tensor extension; --triton serves only that protocol. Bad bodies get a 400 or
413, a body that does not arrive in time a 408, a full queue a 503. Prometheus metrics at GET
/metrics (--ray: from every replica; --triton: Triton's own on --port + 2). The default server also
swaps its model under load (POST /v2/repository/models/moe/load, or SIGHUP) and, with --grpc-port,
serves the Open Inference Protocol over gRPC (docs/operating.md)."""
import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import config
from moebench.cli import (ArgumentParser, UserError, error_line, for_the_user, non_negative_float, non_negative_int,
                          port_number, positive_float, positive_int, run)
from moebench.runners.served import BACKENDS
from moebench.serving import metrics, repository
from moebench.serving.engine import Engine
from moebench.serving.http_app import BODY_TIMEOUT_S


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="model.onnx", help="ONNX model from export_onnx.py (default model.onnx)")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="onnxruntime",
                        help="; ".join(f"{name}: {served.what}" for name, served in BACKENDS.items())
                        + " (default onnxruntime)")
    parser.add_argument("--checkpoint", default=config.CHECKPOINT_PATH,
                        help=f"what --backend fused-int8 is built from (default {config.CHECKPOINT_PATH})")
    parser.add_argument("--precision", choices=("auto", "f32", "bf16"), default="auto",
                        help="OpenVINO's precision (default auto: bf16 where the CPU has it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=port_number,
                        help="also serve the Open Inference Protocol over gRPC on this port (KServe's "
                             "GRPCInferenceService, as Triton's gRPC clients call it; Triton's own is 8001)")
    parser.add_argument("--replicas", type=positive_int, default=1,
                        help="model replicas: worker processes, or with --ray Ray Serve replicas (default 1)")
    parser.add_argument("--max-batch-size", type=positive_int, default=64,
                        help="the most images one model call takes (default 64); 1 turns batching off")
    # no wait by default: docs/serving.md has the ladders that chose it for both servers
    parser.add_argument("--batch-wait-ms", type=non_negative_float, default=0.0,
                        help="under load (the last batch held more than one request), how long a batch waits "
                             "for more before the model runs; a lone request never waits (default 0: a batch is "
                             "whatever arrived while the last one ran)")
    parser.add_argument("--max-request-images", "--max-images", type=positive_int, default=1024,
                        help="images one request may carry (default 1024); a model call takes --max-batch-size")
    parser.add_argument("--max-queued", type=positive_int, default=256,
                        help="requests waiting (per worker, or per Ray Serve deployment) before new ones get 503")
    parser.add_argument("--body-timeout-s", type=positive_float, default=BODY_TIMEOUT_S,
                        help="a request's body must arrive whole within this, or it gets a 408 and its place goes to "
                             f"others (default {BODY_TIMEOUT_S:g})")
    parser.add_argument("--http-server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="the HTTP server under serve.py's application: uvicorn (default) or granian, a Rust "
                             "server (loadgen.py measures both)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="no Prometheus metrics at GET /metrics (on by default; with --triton, Triton's own on "
                             "--port + 2); docs/operating.md says how loadgen.py measures what they cost")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="compute threads per replica (default 1; 0: the backend's own choice)")
    ray = parser.add_argument_group("Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true", help="serve with Ray Serve instead of the embedded server")
    ray.add_argument("--address", help="join this Ray cluster (e.g. auto, or head:6379) instead of starting a local "
                                       "one; implies --ray")
    # a request holds a slot from its headers on, a stalled client's too: slots are many, and the replica's
    # own queue (--max-queued) bounds the work waiting for the model, as in the default server
    ray.add_argument("--max-ongoing", type=positive_int, default=1024,
                     help="requests one replica holds at once, from their headers on (max_ongoing_requests, "
                          "default 1024); its model's queue is --max-queued")
    ray.add_argument("--cpus-per-replica", type=non_negative_float, default=1.0,
                     help="CPUs Ray reserves for each replica (default 1)")
    triton = parser.add_argument_group("Triton Inference Server (--triton)")
    triton.add_argument("--triton", action="store_true",
                        help="serve with Triton Inference Server: --replicas model instances, --max-batch-size and "
                             "--batch-wait-ms for its dynamic batcher (its queue is unbounded: docs/serving.md); the "
                             "Open Inference Protocol only, at most --max-batch-size images per request")
    return checked(parser, parser.parse_args(argv))


def checked(parser, args):
    """The flags, once their combination is one serve.py can serve."""
    args.ray = args.ray or bool(args.address)
    if args.triton and (args.ray or args.backend != "onnxruntime"):
        parser.error("--triton serves the ONNX model with ONNX Runtime in Triton's python backend: leave out --ray, "
                     "--address and --backend")
    if (args.grpc_port or args.http_server != "uvicorn") and (args.ray or args.triton):
        parser.error("--grpc-port and --http-server are serve.py's own server's: leave out --ray, --address and "
                     "--triton")
    args.served = BACKENDS[args.backend]
    if args.ray and args.served.from_checkpoint:
        parser.error(f"--backend {args.backend} reads the checkpoint with this repository's own files, which Ray "
                     "workers do not have: serve it without --ray, or use onnxruntime or openvino with --ray")
    return args


def require_free_port(host, port, flag="--port", advice=None):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host {host} {flag} {port}: cannot listen there ({error.strerror or error}); "
                            + (advice or f"choose another {flag}"))


def stop_on_signals():
    """Ctrl-C and SIGTERM both end in a clean shutdown, also where the shell that started us set
    SIGINT to be ignored (a background job), and after Ray installed its own SIGTERM handler."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def check_backend(args, payload):
    """Make the backend once here, so that what cannot run (no compiler, no OpenVINO, a checkpoint
    the fused operator cannot take) is one line before any worker starts. It runs on a thread that
    then ends: made on the main thread, OpenVINO's engine on a CPU with AMX often made Ctrl-C end
    this process with a segmentation fault (docs/serving.md)."""
    try:
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(described_engine, args, payload).result()
    except Exception as error:
        if for_the_user(error):
            raise
        raise UserError(f"--backend {args.backend} could not start ({error_line(error, 300)})")


def described_engine(args, payload):
    engine = Engine(args.served, payload, args.threads, args.precision, args.checkpoint)
    return {**engine.describe(), "experts": engine.experts}


def announce_when_answering(args, described):
    """Print the 'serving' line once the first worker answers GET / (a worker loads the model first)."""
    url = f"http://{args.host if args.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{args.port}/"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:  # never a URL where nothing answers
        print(f"error: no worker answered at {url} within 120 s; see the messages above", file=sys.stderr, flush=True)
        return
    print(f"serving {args.checkpoint if args.served.from_checkpoint else args.model} on {args.backend} "
          f"({described['engine']}, {described['precision']}) with {args.replicas} worker(s), batching up to "
          f"{args.max_batch_size} images per call, at http://{args.host}:{args.port}/"
          + (f", gRPC at {args.host}:{args.grpc_port}" if args.grpc_port else "")
          + ("" if args.no_metrics else f", metrics at http://{args.host}:{args.port}/metrics") + " (Ctrl-C stops)",
          flush=True)


def batching(args):
    """What a worker's or a replica's application takes from the flags."""
    return {"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
            "max_queued": args.max_queued, "max_request_images": args.max_request_images, "body_timeout_s": args.body_timeout_s}


def serve_here(args, payload):
    from moebench.serving import http_app
    require_free_port(args.host, args.port)
    described = check_backend(args, payload)
    if args.grpc_port:
        require_free_port(args.host, args.grpc_port, "--grpc-port")
    settings = {"model": os.path.abspath(args.model), "checkpoint": os.path.abspath(args.checkpoint),
                "backend": args.backend, "threads": args.threads, "precision": args.precision,
                "host": args.host, "grpc_port": args.grpc_port, "http_server": args.http_server, **batching(args)}
    threading.Thread(target=announce_when_answering, args=(args, described), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="moe-serve-") as run:  # what this run's processes share
        settings["orders"] = os.path.join(run, "order.json")
        with contextlib.nullcontext() if args.no_metrics else metrics.multiprocess_directory(run):
            http_app.serve(settings, args.host, args.port, args.replicas)  # until Ctrl-C or SIGTERM
    print("stopped", flush=True)


def serve_with_ray(args, payload):
    from moebench.serving import ray_serve
    state = {"started_serve": False, "deployed": False}
    replicas = ray_serve.Replicas(args.replicas, args.max_ongoing, args.max_queued, args.cpus_per_replica)
    with tempfile.TemporaryDirectory(prefix="moe-serve-") as run:  # the replicas' metrics, removed after Ray stopped
        try:
            if not args.address:
                require_free_port(args.host, args.port)
            settings = {**batching(args), "metrics_directory": None if args.no_metrics else os.path.join(run, "metrics")}
            url = ray_serve.start(args.address, args.host, args.port, state, lambda: ray_serve.deployment(
                replicas, args.served, payload, args.threads, args.precision, settings))
            stop_on_signals()
            print(f"serving {args.model} on {args.backend} with Ray Serve, {args.replicas} replica(s), batching "
                  + (f"up to {args.max_batch_size} images per call, {args.batch_wait_ms:g} ms wait"
                     if args.max_batch_size > 1 else "off") + f", at {url}"
                  + ("" if args.no_metrics else f", metrics at {url.split(' ')[0]}metrics") + " (Ctrl-C stops)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...", flush=True)
        finally:
            ray_serve.stop(state)
    print("stopped", flush=True)


def serve_with_triton(args, payload):
    from moebench.serving import triton
    require_free_port(args.host, args.port)
    metrics_port = None if args.no_metrics else args.port + triton.METRICS_PORT_OFFSET
    if metrics_port:
        require_free_port(args.host, metrics_port, "metrics port (--port + 2)",
                          "choose another --port, or leave Triton's metrics out with --no-metrics")
    described = check_backend(args, payload)
    settings = {**batching(args), "instances": args.replicas, "threads": args.threads}
    stop_on_signals()

    def announce(url):
        print(f"serving {args.model} on Triton Inference Server (python backend, {described['engine']}) with "
              f"{args.replicas} instance(s), dynamic batching up to {args.max_batch_size} images, "
              f"{args.batch_wait_ms:g} ms queue delay, at {url}v2/models/moe"
              + (f", Triton's metrics at http://{args.host}:{metrics_port}/metrics" if metrics_port else "")
              + " (Ctrl-C stops)", flush=True)
    triton.serve(payload, described["experts"], settings, args.host, args.port, announce, metrics_port)
    print("stopped", flush=True)


def main(argv=None):
    args = parse_args(argv)
    payload = b"" if args.served.from_checkpoint else repository.checked_model_bytes(args.model)
    (serve_with_ray if args.ray else serve_with_triton if args.triton else serve_here)(args, payload)


if __name__ == "__main__":
    run(main)
