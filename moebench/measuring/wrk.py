"""wrk, a C HTTP load generator (Debian's package; tests/install_tools.sh installs it): a closed loop
of N keep-alive connections, each sending its next request as soon as the last is answered, on one
thread. It carries tens of thousands of requests/s on one core, so it measures servers that Python
clients cannot. A Lua script sets the body and headers and prints the summary as JSON."""
import json
import os
import shutil
import subprocess
import tempfile

from ..cli import UserError

INSTALL = "bash tests/install_tools.sh (Debian's wrk)"
PERCENTILES = (50, 90, 99, 99.9)
SCRIPT = """
local f = assert(io.open(%(body)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
%(headers)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %%d, "duration_us": %%d, "connect_errors": %%d, ' ..
    '"read_errors": %%d, "write_errors": %%d, "non_2xx": %%d, "timeouts": %%d, "percentiles_us": {',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  local first = true
  for _, p in ipairs({%(percentiles)s}) do
    if not first then io.write(", ") end
    first = false
    io.write(string.format('"%%g": %%d', p, latency:percentile(p)))
  end
  io.write("}}\\n")
end
"""


def available():
    return shutil.which("wrk") is not None


def lua_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script(body_path, headers):
    lines = "\n".join(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())
    return SCRIPT % {"body": lua_string(body_path), "headers": lines,
                     "percentiles": ", ".join(f"{p:g}" for p in PERCENTILES)}


def load(url, body, headers, connections, duration_s, timeout_s=10):
    """One closed-loop run of `connections` connections for `duration_s` seconds, each POSTing `body`
    with `headers`: {requests_per_s, p50_ms, p90_ms, p99_ms, p99.9_ms, errors} (errors: refused
    (non-2xx) and failed requests, which are counted but not in requests_per_s)."""
    if not available():
        raise UserError(f"wrk is not installed: {INSTALL}")
    with tempfile.TemporaryDirectory() as folder:
        body_path, script_path = os.path.join(folder, "body"), os.path.join(folder, "post.lua")
        with open(body_path, "wb") as f:
            f.write(body)
        with open(script_path, "w") as f:
            f.write(script(body_path, headers))
        run = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", f"--timeout={timeout_s:g}s",
                              "-s", script_path, url], capture_output=True, text=True, timeout=duration_s + 60)
    found = [line for line in run.stdout.splitlines() if line.startswith("WRK_JSON ")]
    if run.returncode or not found:
        raise UserError(f"wrk against {url} failed (exit {run.returncode}): {(run.stderr or run.stdout).strip()[-300:]}")
    summary = json.loads(found[-1].removeprefix("WRK_JSON "))
    errors = sum(summary[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    good = summary["requests"] - summary["non_2xx"] - errors
    return {"connections": connections, "duration_s": summary["duration_us"] / 1e6,
            "requests_per_s": good / (summary["duration_us"] / 1e6), "requests": summary["requests"],
            "non_2xx": summary["non_2xx"], "errors": errors,
            **{f"p{p}_ms": summary["percentiles_us"][f"{p:g}"] / 1e3 for p in PERCENTILES}}
