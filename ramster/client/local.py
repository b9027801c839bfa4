# LocalNode: a node in a subprocess (`python -m node`) on free loopback ports, for tests,
# benchmarks and `ramster bench node` without --target.  It waits for the node's --port-file
# (written only once the node listens), so callers never race the startup; its stderr log goes to
# a file in the node's own temporary directory, readable with log().  `tls_ca` is the CA its
# clients need when the node serves TLS (client() uses it); the port file also names the peer
# port when the node has peers.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ramster.client.errors import Unavailable
from ramster.client.sync import Client


class LocalNode:
    def __init__(
        self,
        *args: str,
        data_dir: Path | None = None,
        metrics: bool = True,
        tls_ca: Path | None = None,
        token: str | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ramster-node-")
        root = Path(self._tmp.name)
        self.data_dir = data_dir or root / "data"
        self.port_file = root / "ports.json"
        self.log_path = root / "node.log"
        self.args = [
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0" if metrics else "",
            "--port-file",
            str(self.port_file),
            "--data-dir",
            str(self.data_dir),
            *args,
        ]
        self.tls_ca = tls_ca
        self.token = token  # for client(), when the node is started with --tokens
        self.port = 0
        self.peer_port: int | None = None
        self.metrics_port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> Client:
        """A blocking client of the node (over TLS when the node serves it, with its token)."""
        return Client(self.target, timeout=timeout, tls_ca=self.tls_ca, token=self.token)

    @property
    def running(self) -> bool:
        return self._live() is not None

    def _live(self) -> subprocess.Popen[bytes] | None:
        """The node's process while it runs."""
        process = self.process
        return process if process is not None and process.poll() is None else None

    def start(self, timeout: float = 60.0) -> LocalNode:
        """Start the node (again, after a stop or kill: same arguments, same data directory)."""
        if self.running:
            raise RuntimeError("the local node is running already: stop or kill it first")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            # -P: the installed node, not a `node/` package in the working directory (a
            # source checkout, where `pip install .` left no built extension)
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "node", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise Unavailable(f"the local node did not start: {self.log().strip()[-500:]}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        self.peer_port = ports["peer_port"]
        return self

    def send_signal(self, sig: int) -> None:
        if process := self._live():
            process.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        """The node's exit status, once it has exited (killing it after `timeout`)."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if process := self._live():
            process.kill()
            process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LocalNode:
        """Start the node unless it runs already (`with LocalNode(...).start() as node`)."""
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._tmp.cleanup()
