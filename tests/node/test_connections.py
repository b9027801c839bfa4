# Each gRPC listener against clients that open connections and never finish their handshake:
# it holds at most --max-connections of them (past it a connection is closed as soon as it is
# accepted), closes those after HANDSHAKE_SECONDS, and then serves calls as before.  The node
# runs in the test's process, so its descriptors are this process's, less the test's sockets.
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from node import server as node_server
from node.server import Node
from node.settings import HostPort
from ramster.client import AsyncClient
from tests.node.conftest import half_sent, node_settings

LIMIT = 8
OPENED = 40
PREFACE_HALF = b"PRI * HTTP/2.0\r\n"  # the first half of the HTTP/2 client preface
SLACK = 3  # descriptors the node may open meanwhile for its own work (/proc reads, a log)


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def held_over(baseline: int, seconds: float) -> int:
    """The most descriptors the node held over `baseline` (the test's own sockets not counted),
    sampled for `seconds`."""
    most = 0
    for _ in range(int(seconds / 0.05)):
        most = max(most, descriptors() - baseline)
        await asyncio.sleep(0.05)
    return most


@pytest.mark.parametrize("listener", ["client", "peer"])
async def test_half_open_connections_are_bounded_and_then_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listener: str
) -> None:
    monkeypatch.setattr(node_server, "HANDSHAKE_SECONDS", 1.0)
    settings = node_settings(tmp_path, max_connections=LIMIT, peer_listen=HostPort("127.0.0.1", 0))
    node = Node(settings)
    await node.start()
    try:
        port = node.port if listener == "client" else node.peer_port
        assert port
        baseline = descriptors() + OPENED  # the test's sockets
        socks = half_sent(port, OPENED, PREFACE_HALF)
        try:
            assert await held_over(baseline, 0.6) <= LIMIT + SLACK  # the rest closed as accepted
            for _ in range(100):  # the handshake timeout closes the ones it held
                if descriptors() - baseline <= SLACK:
                    break
                await asyncio.sleep(0.1)
            assert descriptors() - baseline <= SLACK
        finally:
            for sock in socks:
                sock.close()
        async with AsyncClient(node.target, timeout=10) as client:
            assert (await client.stats()).node_id == "test-node"
    finally:
        await node.stop(grace=1)
