"""Starting or joining Ray for serve.py, with what Ray's own messages leave out: a join refused for
its authentication token says what to set; an application is never announced on an HTTP port where
the cluster's Serve instance does not listen; leaving a cluster removes only what serve.py added."""
import os
import tempfile
from contextlib import contextmanager

from ..cli import UserError, error_line

# Ray 2.60's `ray start` turns token authentication on; a driver must say so too.
AUTH_HELP = ("clusters started with `ray start` require token authentication: export RAY_AUTH_MODE=token, "
             "with the cluster's token in RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it) "
             "or in ~/.ray/auth_token (where `ray start --head` wrote it on the head node)")
AUTH_REFUSED = ("InvalidAuthToken", "Unauthenticated")


def keep_local_ray_on_loopback():
    """A local Ray instance (no --address) talks over 127.0.0.1 only: by default Ray swaps 127.0.0.1
    for the machine's outward address so that other nodes could join, which a local one never needs.
    Set before ray is imported; Ray reads it then."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextmanager
def stderr_captured():
    """File descriptor 2, where Ray's C++ core writes its connection errors, into a temporary file."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield capture
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def init(address, runtime_env):
    """ray.init, local or joining `address`; a failure is one line, an authentication refusal
    says what to set."""
    import ray
    with stderr_captured() as core_log:
        try:
            if address:
                ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
            else:
                # "local": a new instance of its own, never a cluster that `ray start` left running here
                ray.init(address="local", runtime_env=runtime_env, include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False)
            return
        except Exception as error:
            failure = error
        core_log.seek(0)
        said = core_log.read().decode(errors="replace")
    if address and any(word in said for word in AUTH_REFUSED):
        mode = os.environ.get("RAY_AUTH_MODE", "")
        raise UserError(f"--address {address}: the Ray cluster refused this client's authentication ("
                        + ("RAY_AUTH_MODE is not set" if mode != "token" else "the token is not the cluster's")
                        + f"); {AUTH_HELP}")
    where = f"the Ray cluster at --address {address}" if address else "a local Ray instance"
    raise UserError(f"cannot start or join {where} ({error_line(failure)})")


def running_serve_http():
    """(host, port) of the Serve instance already running on the cluster, or None if there is none."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    config = ray.get(controller.get_http_config.remote())
    return config.host, config.port


def require_same_http(running, host, port, address):
    """Ray Serve keeps the first HTTP settings a cluster got and ignores later ones (with a log line
    only); so an application must go where the running instance listens, or not at all."""
    if running and (running[0], running[1]) != (host, port):
        raise UserError(f"--address {address}: Ray Serve already runs on this cluster with its HTTP proxies on "
                        f"{running[0]}:{running[1]}, and Ray would ignore --host {host} --port {port}; pass "
                        f"--host {running[0]} --port {running[1]} to serve there, or shut that Serve instance "
                        "down first")


def node_of_this_process():
    """(Ray node id, node IP) of the process that calls it: which node answered a request."""
    import ray
    return ray.get_runtime_context().get_node_id()[:12], ray.util.get_node_ip_address()
