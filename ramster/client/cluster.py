# LocalCluster: several nodes as subprocesses on loopback that know each other, for the demo,
# cluster tests and `ramster bench cluster`.  Ports are picked free up front (peers must be
# named before anyone starts), below the ephemeral range so no outgoing connection takes one
# first: a client port and a peer port per node, the peer list naming the
# peer ports; each node gets its own node id, data directory and log.  With tls=True a fresh
# CA and node certificates (ramster/certs.py) go to a temporary directory: peers speak mTLS,
# clients TLS (LocalNode.client() knows the CA), exactly as a deployed cluster would.
# `grow()` starts more nodes at runtime that know a single seed, as an operator scaling out
# would.
from __future__ import annotations

import random
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ramster.certs import make_bundle
from ramster.client.errors import Unavailable
from ramster.client.local import LocalNode


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1, held open together so they differ, and picked below the
    kernel's ephemeral range: a port from that range may become the source port of some
    outgoing connection (the first nodes' heartbeats, say) before its node gets to bind it."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(max(1024, low - 12000), low)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class LocalCluster:
    def __init__(
        self,
        size: int = 3,
        common: Sequence[str] = (),
        per_node: Sequence[Sequence[str]] = (),
        metrics: bool = True,
        tls: bool = False,
        token: str | None = None,
    ) -> None:
        ports = free_ports(2 * size)
        self.ports, self.peer_ports = ports[:size], ports[size:]
        peers = ",".join(f"127.0.0.1:{p}" for p in self.peer_ports)
        names = [f"node{i + 1}" for i in range(size)]
        self.common, self.metrics, self.token = common, metrics, token
        self._certs = tempfile.TemporaryDirectory(prefix="ramster-certs-") if tls else None
        # a few spare node certificates, for nodes that join later (grow)
        spare = [f"node{i + 1}" for i in range(size, size + 4)]
        self._bundle = make_bundle(Path(self._certs.name), names + spare) if self._certs else None
        self.nodes = []
        for i, name in enumerate(names):
            extra = per_node[i] if i < len(per_node) else ()
            self.nodes.append(self._node(name, self.ports[i], self.peer_ports[i], peers, extra))

    def _node(
        self, name: str, port: int, peer_port: int, seeds: str, extra: Sequence[str]
    ) -> LocalNode:
        bundle, tls_args = self._bundle, []
        if bundle:
            cert, key = bundle.nodes[name]
            tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(bundle.ca)]
        return LocalNode(
            "--listen",
            f"127.0.0.1:{port}",
            "--peer-listen",
            f"127.0.0.1:{peer_port}",
            "--node-id",
            name,
            "--peers",
            seeds,
            *tls_args,
            *self.common,
            *extra,
            metrics=self.metrics,
            tls_ca=bundle.ca if bundle else None,
            token=self.token,
        )

    def grow(
        self, count: int, seed: int = 0, host: str = "127.0.0.1", timeout: float = 60.0
    ) -> list[LocalNode]:
        """Start `count` more nodes that know only node `seed`'s peer port, at `host` (another
        name of this host makes the seed an alias of a member); they learn the rest from it,
        and the cluster learns them.  The new nodes, started."""
        added = []
        for port, peer_port in zip(*[iter(free_ports(2 * count))] * 2, strict=True):
            name = f"node{len(self.nodes) + 1}"
            seeds = f"{host}:{self.peer_ports[seed]}"
            node = self._node(name, port, peer_port, seeds, ())
            self.ports.append(port)
            self.peer_ports.append(peer_port)
            self.nodes.append(node)
            added.append(node.start(timeout))
        return added

    @property
    def targets(self) -> list[str]:
        return [n.target for n in self.nodes]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        for node in self.nodes:
            node.start(timeout)
        self.wait_peers(timeout)
        return self

    def wait_peers(self, timeout: float = 60.0, nodes: Sequence[LocalNode] | None = None) -> None:
        """Until every running node sees every other running node up."""
        running = [n for n in (nodes or self.nodes) if n.running]
        deadline = time.monotonic() + timeout
        for node in running:
            with node.client(timeout=5) as client:
                while True:
                    try:  # a node just restarted may be refused for a moment (channel backoff)
                        stats = client.stats()
                        seen = f"{stats.peers_up} peers up"
                        if stats.peers_up >= len(running) - 1 and stats.peers >= len(running) - 1:
                            break
                    except Unavailable as exc:
                        seen = str(exc)
                    if time.monotonic() > deadline:
                        raise Unavailable(f"{node.target}: {seen}")
                    time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.__exit__()
        if self._certs:
            self._certs.cleanup()
