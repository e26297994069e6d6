"""Serve an exported model over HTTP with Ray Serve: dynamic batching, replicas, backpressure, and
the same application on a laptop or a multi-node Ray cluster (--address).

POST / with raw uint8 pixels (784 bytes per 28x28 image, any number of images) or JSON
{"images": [[784 values 0-255], ...]} (28x28 nested lists work too); the answer is JSON with each
image's class, logits and chosen experts with their gate weights. GET / says what is served."""
import os
import signal
import socket
import time

from moebench import contract, ray_cluster, serving
from moebench.runners import registry
from moebench.cli import (ArgumentParser, UserError, error_line, non_negative_float, port_number, positive_int,
                        require_module, run)

APP_NAME = "moe"
PACKAGE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moebench")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="model.onnx", help="ONNX model from export_onnx.py (default model.onnx)")
    parser.add_argument("--backend", choices=tuple(registry.SERVED), default="onnxruntime",
                        help="; ".join(f"{name}: {what}" for name, what in registry.SERVED.items())
                        + " (default onnxruntime)")
    parser.add_argument("--precision", choices=("auto", "f32", "bf16"), default="auto",
                        help="OpenVINO's precision (default auto: bf16 where the CPU has it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="model replicas (default 1)")
    parser.add_argument("--max-batch-size", type=positive_int, default=32,
                        help="requests one batch may gather (@serve.batch); 1 turns batching off (default 32)")
    parser.add_argument("--batch-wait-ms", type=non_negative_float, default=2.0,
                        help="how long a batch waits for more requests (default 2 ms)")
    parser.add_argument("--max-images", type=positive_int, default=1024, help="images one request may carry")
    parser.add_argument("--max-ongoing", type=positive_int, default=64,
                        help="requests one replica works on at once (max_ongoing_requests, default 64)")
    parser.add_argument("--max-queued", type=positive_int, default=256,
                        help="requests waiting for a replica before new ones get 503 (max_queued_requests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads per replica (default 1; 0: the backend's own choice)")
    parser.add_argument("--cpus-per-replica", type=non_negative_float, default=1.0,
                        help="CPUs Ray reserves for each replica (default 1)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://head:10001) instead of "
                                          "starting a local one")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def model_bytes(path):
    """The model file's bytes, once it has passed the contract and has the 'gates' output."""
    model = contract.check_onnx(path)
    if contract.GATES not in [o.name for o in model.graph.output]:
        raise UserError(f"{path} has no '{contract.GATES}' output, which the answers need; "
                        "export it with export_onnx.py")
    with open(path, "rb") as f:
        return f.read()


def require_free_port(host, port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                            "choose another --port")


def deployment(args, payload):
    """The Ray Serve application: a replica class with @serve.batch, bound to the model bytes."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                      max_queued_requests=args.max_queued, ray_actor_options={"num_cpus": args.cpus_per_replica})
    class MoEClassifier:
        def __init__(self, model, backend, threads, precision, max_batch_size, batch_wait_s, max_images):
            self.engine = serving.Engine(model, backend, threads, precision)
            self.batching, self.max_images = max_batch_size > 1, max_images
            self.classify_batch.set_max_batch_size(max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(batch_wait_s)
            node, node_ip = ray_cluster.node_of_this_process()
            self.served_by = {"replica": serve.get_replica_context().replica_id.unique_id,
                              "host": socket.gethostname(), "pid": os.getpid(), "node": node, "node_ip": node_ip}

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def classify_batch(self, requests):
            """Many requests' images in one model call, split back per request."""
            import numpy as np
            answers = self.engine.classify(np.concatenate(requests))
            sizes = np.cumsum([0] + [len(r) for r in requests])
            return [answers[start:end] for start, end in zip(sizes[:-1], sizes[1:])]

        async def __call__(self, request):
            if request.method == "GET":
                return JSONResponse({"model": "MoE MNIST classifier", **self.engine.describe(),
                                     "batching": self.batching, "served_by": self.served_by})
            try:
                images = serving.parse(await request.body(), request.headers.get("content-type"), self.max_images)
            except serving.RequestError as error:
                return JSONResponse({"error": str(error)}, status_code=error.status)
            answers = (await self.classify_batch(images)) if self.batching else self.engine.classify(images)
            return JSONResponse({"predictions": answers, "served_by": self.served_by})

    return MoEClassifier.bind(payload, args.backend, args.threads, args.precision, args.max_batch_size,
                              args.batch_wait_ms / 1000.0, args.max_images)


def require_reachable(address):
    """A host:port address must answer before Ray is asked to join it: Ray itself retries for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError) as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error}); start one with "
                        "'ray start --head' on that machine, or leave --address out for a local one")


def start(args, state):
    """Start Ray (or join it) and the application; returns the URL it answers on. Sets
    state["started_serve"] once it knows whether it starts Ray Serve, and state["deployed"] once
    its application runs: what stop() must undo."""
    import logging
    if not args.address:
        ray_cluster.keep_local_ray_on_loopback()
    require_module("ray.serve", "serve.py")
    from ray import serve
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own line says where it serves
    payload = model_bytes(args.model)
    if args.address:
        require_reachable(args.address)
    else:
        require_free_port(args.host, args.port)
    # the replicas import moebench.serving, on every node
    ray_cluster.init(args.address, {"py_modules": [PACKAGE_FOLDER]})
    running = ray_cluster.running_serve_http()
    ray_cluster.require_same_http(running, args.host, args.port, args.address)
    state["started_serve"] = running is None
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(deployment(args, payload), name=APP_NAME, route_prefix="/")
        state["deployed"] = True
    except Exception as error:
        raise UserError(f"the application did not start ({error_line(error, 300, last=True)})")
    every_address = args.host in ("0.0.0.0", "::")
    host = ray_cluster.node_of_this_process()[1] if every_address else args.host
    return f"http://{host}:{args.port}/" + (f" (and port {args.port} of every node)" if every_address and args.address
                                             else "")


def stop(state):
    """Leave Ray as it was found: shut Serve down if this process started it, else remove only the
    application it deployed (never one that was running before)."""
    try:
        import ray
        from ray import serve
    except ImportError:  # said already by start()
        return
    if ray.is_initialized():
        if state["started_serve"]:
            serve.shutdown()
        elif state["deployed"]:
            serve.delete(APP_NAME)
        ray.shutdown()


def stop_on_signals():
    """Ctrl-C and SIGTERM both end in a clean shutdown, also where the shell that started us set
    SIGINT to be ignored (a background job), and after Ray installed its own SIGTERM handler."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None):
    args = parse_args(argv)
    state = {"started_serve": False, "deployed": False}
    try:
        url = start(args, state)
        stop_on_signals()
        print(f"serving {args.model} on {args.backend} with {args.replicas} replica(s), batching "
              + (f"up to {args.max_batch_size} requests, {args.batch_wait_ms:g} ms wait" if args.max_batch_size > 1
                 else "off") + f", at {url} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        stop(state)
    print("stopped", flush=True)


if __name__ == "__main__":
    run(main)
