"""h2load, nghttp2's C load generator for HTTP/2 (Debian's nghttp2-client; tests/install_tools.sh
installs it), driving gRPC: every request is one POST of a gRPC frame (a flag byte, a 4-byte length,
the serialized message) with gRPC's headers, on N connections with one stream each, a closed loop
like wrk's. h2load reads HTTP statuses only, and a gRPC error is a 200 with grpc-status in the
trailers: a caller checks a real answer to the same request with a gRPC client."""
import os
import re
import shutil
import subprocess
import tempfile

from ..cli import UserError

INSTALL = "bash tests/install_tools.sh (Debian's nghttp2-client)"
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def available():
    return shutil.which("h2load") is not None


def grpc_frame(message_bytes):
    """A gRPC message as it travels: uncompressed, its length, the message."""
    return b"\x00" + len(message_bytes).to_bytes(4, "big") + message_bytes


def load(url, body, headers, connections, duration_s, warm_up_s=1):
    """`connections` HTTP/2 connections, one stream each, POSTing `body` for `duration_s` seconds after
    `warm_up_s` (whose requests h2load does not count): {connections, requests_per_s, requests, failed}
    (failed: errored or non-2xx, not in requests_per_s)."""
    if not available():
        raise UserError(f"h2load is not installed: {INSTALL}")
    with tempfile.TemporaryDirectory() as folder:
        body_path = os.path.join(folder, "body")
        with open(body_path, "wb") as f:
            f.write(body)
        command = ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{duration_s:g}", f"--warm-up-time={warm_up_s:g}",
                   "-d", body_path, *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")], url]
        run = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + warm_up_s + 60)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                       run.stdout)
    if run.returncode or not counts:
        raise UserError(f"h2load against {url} failed (exit {run.returncode}): {(run.stderr or run.stdout).strip()[-300:]}")
    succeeded, failed, errored = (int(counts.group(i)) for i in (3, 4, 5))  # of the measured duration only
    return {"connections": connections, "requests_per_s": succeeded / duration_s, "requests": succeeded + failed + errored,
            "failed": failed + errored}
