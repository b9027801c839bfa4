# Per-client fairness: a client (its tenant, or its address without tokens) runs at most
# CLIENT_PARTS parts of batches at once, the rest queue in order while other clients go on; a
# big unary batch goes through the engine in parts, each its own turn, so work queued behind it
# runs between its parts; and the codec threads end with the node.
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from node.engine import ChunkedEngine
from node.fairness import ClientTurns
from node.server import Node
from node.servicer import CLIENT_PARTS, PART_PAGES
from node.tenants import Tenant, client_of
from ramster.client import AsyncClient, KeyRange
from ramster.zcache import PutResult
from tests.node.conftest import node_settings
from tests.node.test_codecworkers import codec_threads

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
BOUND = 30  # seconds: a wait that passes this failed (the node never got there)


async def test_a_busy_client_queues_while_another_goes_on() -> None:
    turns = ClientTurns(2)
    order: list[str] = []
    release = asyncio.Event()

    async def batch(client: str, name: str) -> None:
        async with turns.turn(client):
            order.append(name)
            await release.wait()

    async def quick(client: str, name: str) -> None:
        async with turns.turn(client):
            order.append(name)

    held = [asyncio.create_task(batch("a", f"a{n}")) for n in range(2)]
    third = asyncio.create_task(quick("a", "a2"))
    other = asyncio.create_task(quick("b", "b0"))
    await other  # "b" is not held up by "a"'s queue; every task above has run by now
    assert order == ["a0", "a1", "b0"] and not third.done()
    assert turns.clients == 1
    release.set()
    await asyncio.gather(*held, third)
    assert order == ["a0", "a1", "b0", "a2"]
    assert turns.clients == 0  # nothing is kept for a client with nothing running


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


def test_a_client_is_its_tenant_or_else_its_address() -> None:
    alice = Tenant("alice", max_pools=1)
    anyone = Tenant("", max_pools=1)
    assert client_of(alice, "ipv4:127.0.0.1:5555") == client_of(alice, "ipv6:[::1]:6666")
    assert client_of(alice, "ipv4:127.0.0.1:5555") != client_of(Tenant("bob", 1), "ipv4:1:2")
    assert client_of(anyone, "ipv4:127.0.0.1:5555") == client_of(anyone, "ipv4:127.0.0.1:7777")
    assert client_of(anyone, "ipv4:127.0.0.1:5555") != client_of(anyone, "ipv4:127.0.0.2:5555")
    assert client_of(anyone, "ipv6:[::1]:5555") == "address:ipv6:[::1]"


class Engine:
    """ChunkedEngine.put_runs (which the servicer's put batches take), recording the object id
    of each part that enters it (and its size); a part of an object in `held` waits for that
    object's event first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered: list[tuple[int, int]] = []
        self.held: dict[int, asyncio.Event] = {}
        self.arrived: dict[int, asyncio.Event] = {}
        original = ChunkedEngine.put_runs

        async def put_runs(
            chunked: ChunkedEngine,
            pool: int,
            keys: list[tuple[int, int]],
            runs: Sequence[bytes | memoryview],
        ) -> list[PutResult]:
            oid = keys[0][0]
            self.entered.append((oid, len(keys)))
            self.arrival(oid).set()
            if oid in self.held:
                await self.held[oid].wait()
            return await original(chunked, pool, keys, runs)

        monkeypatch.setattr(ChunkedEngine, "put_runs", put_runs)

    def arrival(self, oid: int) -> asyncio.Event:
        return self.arrived.setdefault(oid, asyncio.Event())

    def oids(self) -> list[int]:
        return [oid for oid, _ in self.entered]


@pytest.fixture
async def tenant_node(tmp_path: Path) -> AsyncIterator[Node]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[tenants.alice]\ntokens = ["{ALICE}"]\n[tenants.bob]\ntokens = ["{BOB}"]\n')
    started = Node(node_settings(tmp_path, tokens=tokens))
    await started.start()
    yield started
    await started.stop(grace=1)


async def test_turns_are_per_tenant_and_a_big_unary_batch_yields_between_parts(
    tenant_node: Node, monkeypatch: pytest.MonkeyPatch, sample_pages: list[bytes]
) -> None:
    assert CLIENT_PARTS == 2  # the scenario below holds both of alice's turns
    engine = Engine(monkeypatch)
    asked: list[str] = []
    third_ask = asyncio.Event()
    original_turn = ClientTurns.turn

    def turn(turns: ClientTurns, client: str) -> AbstractAsyncContextManager[None]:
        asked.append(client)
        if asked.count("tenant:alice") == 3:
            third_ask.set()
        return original_turn(turns, client)

    monkeypatch.setattr(ClientTurns, "turn", turn)
    big, other, small, bobs = 1, 2, 3, 9
    engine.held = {big: asyncio.Event(), other: asyncio.Event()}

    def pages(count: int) -> list[bytes]:
        return [sample_pages[n % len(sample_pages)] for n in range(count)]

    target = tenant_node.target
    async with (
        AsyncClient(target, token=ALICE) as alice1,
        AsyncClient(target, token=ALICE) as alice2,
        AsyncClient(target, token=ALICE) as alice3,
        AsyncClient(target, token=BOB) as bob,
    ):
        pool, bob_pool = await alice1.create_pool(), await bob.create_pool()
        # alice, on two connections: a 4-part unary batch and a 1-part one, both held in the
        # engine, so both of her turns are taken
        first = asyncio.create_task(
            alice1.put_batch(pool, KeyRange(big, 0, 4 * PART_PAGES), pages(4 * PART_PAGES))
        )
        await asyncio.wait_for(engine.arrival(big).wait(), BOUND)
        second = asyncio.create_task(
            alice2.put_batch(pool, KeyRange(other, 0, PART_PAGES), pages(PART_PAGES))
        )
        await asyncio.wait_for(engine.arrival(other).wait(), BOUND)
        # bob is another client: his batch goes through meanwhile
        await asyncio.wait_for(
            bob.put_batch(bob_pool, KeyRange(bobs, 0, 2 * PART_PAGES), pages(2 * PART_PAGES)), BOUND
        )
        # alice's third connection is the same client: its batch waits for one of her turns
        third = asyncio.create_task(
            alice3.put_batch(pool, KeyRange(small, 0, PART_PAGES), pages(PART_PAGES))
        )
        await asyncio.wait_for(third_ask.wait(), BOUND)
        assert engine.oids() == [big, other, bobs, bobs]
        # the big batch's first part ends: its second part queues behind the small batch
        engine.held[big].set()
        await asyncio.wait_for(third, BOUND)
        engine.held[other].set()
        await asyncio.wait_for(asyncio.gather(first, second), BOUND)
        assert engine.oids() == [big, other, bobs, bobs, small, big, big, big]
        assert {size for _, size in engine.entered} == {PART_PAGES}
        got = await alice1.get_batch(pool, KeyRange(big, 0, 4 * PART_PAGES))
        assert len(got.pages) == 4 * PART_PAGES
