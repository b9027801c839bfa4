# Per-connection fairness (a connection runs at most PEER_BATCHES batches at once, the rest queue
# in order while other connections go on) and the codec threads' end with the node.
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from node.fairness import PeerTurns
from node.server import Node
from ramster.client import AsyncClient, KeyRange
from tests.node.conftest import node_settings


async def test_a_busy_peer_queues_while_another_goes_on() -> None:
    turns = PeerTurns(2)
    order: list[str] = []
    release = asyncio.Event()

    async def batch(peer: str, name: str) -> None:
        async with turns.turn(peer):
            order.append(name)
            await release.wait()

    async def quick(peer: str, name: str) -> None:
        async with turns.turn(peer):
            order.append(name)

    held = [asyncio.create_task(batch("a", f"a{n}")) for n in range(2)]
    third = asyncio.create_task(quick("a", "a2"))
    other = asyncio.create_task(quick("b", "b0"))
    await other  # "b" is not held up by "a"'s queue; every task above has run by now
    assert order == ["a0", "a1", "b0"] and not third.done()
    assert turns.peers == 1
    release.set()
    await asyncio.gather(*held, third)
    assert order == ["a0", "a1", "b0", "a2"]
    assert turns.peers == 0  # nothing is kept for a peer with nothing running


def codec_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ramster-codec")]


async def test_stop_ends_the_codec_threads(tmp_path: Path, sample_pages: list[bytes]) -> None:
    assert not codec_threads()
    node = Node(node_settings(tmp_path, worker_threads=2))
    await node.start()
    try:
        async with AsyncClient(node.target) as client:
            pool = await client.create_pool()
            pages = sample_pages[:256]
            outcomes = await client.put_batch(pool, KeyRange(1, 0, len(pages)), pages)
            stored = [None if o.refused else p for o, p in zip(outcomes, pages, strict=True)]
            assert (await client.get_batch(pool, KeyRange(1, 0, len(pages)))).pages == stored
        assert codec_threads()  # the batches ran through them
    finally:
        await node.stop(grace=1)
    assert not codec_threads()
