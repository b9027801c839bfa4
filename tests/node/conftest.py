# Real nodes for the node tests: in-process on the test's event loop (for reaching into the
# engine), and LocalNode subprocesses for what only a process shows (signals, exit status, logs).
# Every node listens on 127.0.0.1 port 0.
from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node.server import Node
from node.settings import HostPort, Settings
from ramster.client import AsyncClient
from ramster.client.local import LocalNode


def node_settings(tmp_path: Path, **changes: object) -> Settings:
    base = Settings(
        listen=HostPort("127.0.0.1", 0),
        metrics_listen=HostPort("127.0.0.1", 0),
        data_dir=tmp_path / "data",
        pool_limit=64 * 1024 * 1024,
        node_id="test-node",
        grace=5.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    started = Node(node_settings(tmp_path))
    await started.start()
    yield started
    await started.stop(grace=1)


@pytest.fixture
async def client(node: Node) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(node.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def local_node() -> Iterator[LocalNode]:
    with LocalNode("--pool-limit", "256Mi") as n:
        yield n


def half_sent(port: int, count: int, start: bytes) -> list[socket.socket]:
    """`count` connections to a local port that each send `start` (the beginning of a
    request, a preface) and never the rest."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(start)
        socks.append(sock)
    return socks
