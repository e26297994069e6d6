"""Netron: serve a model file on localhost, open it in a browser or print the URL to open."""
import os
import signal

from .cli import UserError, port_number, require_module


def add_netron_args(parser):
    group = parser.add_argument_group("Netron")
    group.add_argument("--netron", action="store_true",
                       help="afterwards, serve the model in Netron until Ctrl-C")
    group.add_argument("--netron-host", default="localhost",
                       help="address to serve on (default localhost; 0.0.0.0 to reach it from elsewhere)")
    group.add_argument("--netron-port", type=port_number, default=8080, help="port (default 8080; 0 picks a free one)")
    group.add_argument("--no-browser", action="store_true",
                       help="do not start a browser, only print the URL (headless servers)")


def serve(path, host="localhost", port=8080, browse=True):
    """Serve `path` until Ctrl-C; netron.wait() stops the server cleanly on KeyboardInterrupt."""
    netron = require_module("netron", "--netron")
    # Ctrl-C stops it even where the shell that started us ignores SIGINT (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; nothing to show in Netron")
    try:
        host, port = netron.start(path, address=(host, port), browse=browse)
    except OSError as error:
        raise UserError(f"--netron-host {host} --netron-port {port}: "
                        f"cannot serve there ({error.strerror or error}); choose another port")
    print(f"Netron is serving {path}: open http://{host}:{port} (Ctrl-C stops)", flush=True)
    netron.wait()
    print("Netron stopped", flush=True)


def asked(args):
    """(host, port, browse) when the flags add_netron_args() added ask for Netron, else None."""
    return (args.netron_host, args.netron_port, not args.no_browser) if args.netron else None


def serve_if_asked(path, where):
    """serve(path) at `where` (what asked() returned), unless it is None."""
    if where:
        serve(path, *where)
