"""A server started as a user starts it, from its command line, for loadgen.py and the tests: it is
ready once it prints its 'serving' line, and Ctrl-C (SIGINT) stops it. Its output goes to a log file,
never to a pipe that nobody reads, which would stall the server once full."""
import signal
import socket
import subprocess
import tempfile
import time

from ..cli import UserError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, command, cwd, port, ready="serving ", timeout_s=300):
        self.url = f"http://127.0.0.1:{port}/"
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.process.poll() is None:
            if any(line.startswith(ready) for line in self.output().splitlines()):
                return
            time.sleep(0.2)
        last = [line for line in self.output().splitlines() if line.strip()][-1:]
        self.stop()
        raise UserError(f"{' '.join(command[1:3])} did not start (exit {self.process.poll()}): {last}")

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
