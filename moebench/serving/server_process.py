"""A server started as a user starts it, from its command line, for loadgen.py and the tests: it is
ready once it prints its 'serving' line, and Ctrl-C (SIGINT) stops it. Its output goes to a log file,
never to a pipe that nobody reads, which would stall the server once full."""
import random
import signal
import socket
import subprocess
import tempfile
import time

from ..cli import UserError

RAY_WORKER_PORTS_END = 20000  # Ray's workers take ports from 10002 to 19999 by default


def ephemeral_ports():
    """The range the kernel hands out for port 0 (Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host="127.0.0.1"):
    """A port free now, below the kernel's ephemeral range: a server started after this call (Ray
    above all) binds ports of its own from that range, and could take one picked from it before the
    server that was meant to have it binds it."""
    low = min(ephemeral_ports()[0], 32768)
    start = RAY_WORKER_PORTS_END if low > RAY_WORKER_PORTS_END + 100 else 1024
    for port in random.sample(range(start, low), min(200, low - start)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise UserError(f"no free port found between {start} and {low}")


def end_with_parent():
    """Ask Linux to end this process when its parent dies (a uvicorn worker with its supervisor,
    tritonserver with serve.py): a parent killed with SIGKILL has no time to stop its children, which
    would keep the port and the cores."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown is all there is
        pass


class ServerProcess:
    def __init__(self, command, cwd, port, ready="serving ", timeout_s=300):
        self.url = f"http://127.0.0.1:{port}/"
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.process.poll() is None:
            if any(line.startswith(ready) for line in self.output().splitlines()) and self.accepts(port):
                return
            time.sleep(0.2)
        last = [line for line in self.output().splitlines() if line.strip()][-1:]
        self.stop()
        raise UserError(f"{' '.join(command[1:3])} did not start (exit {self.process.poll()}): {last}")

    @staticmethod
    def accepts(port):
        """Whether the port takes connections: a server may print its line before it listens."""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
