# Small calls ahead of bulk work (node.fairness.SmallFirst): a bulk step waits while a small call
# is pending (at most `hold`, and after a wait not again before bulk ran as long), bulk goes in
# small chunks for `lately` after a small call arrived (but for codec workers), a call that never
# finishes stops counting, bulk steps give their core away (ramster.cores) for `lately` after a
# small call arrived and at most once every YIELD_EVERY, and through a node a single get is served
# between the parts of a big batch with no bulk chunk run from its arrival to its handler, while
# the batch's pages come back byte for byte.  Every hold and lately here is BOUND (or the clock is
# the test's), so nothing depends on how fast the machine is.
from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from node.codecworkers import CodecWorkers
from node.engine import CHUNK_PAGES, WORKER_CHUNK_PAGES, ChunkedEngine
from node.fairness import LATELY_CHUNK_PAGES, SmallFirst
from node.server import Node
from node.servicer import PART_PAGES, TmemServicer
from ramster import cores
from ramster.client import AsyncClient, KeyRange
from ramster.zcache import Encodings, PageError, PoolKind, PutResult, ZCache, ZCacheConfig

BOUND = 30.0  # seconds: a wait that passes this failed
STEPS = 50  # loop steps a held bulk task is given to (wrongly) go on


@pytest.fixture
def engine() -> Iterator[ZCache]:
    cache = ZCache(ZCacheConfig(pool_limit_frames=8192))
    yield cache
    cache.close()


def filed_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every chunk ZCache.file_encoded files, in order."""
    sizes: list[int] = []
    original = ZCache.file_encoded

    def file_encoded(
        cache: ZCache,
        pool: int,
        keys: list[tuple[int, int]],
        encoded: Encodings,
        keys_checked: bool = False,
    ) -> list[PutResult]:
        sizes.append(len(keys))
        return original(cache, pool, keys, encoded, keys_checked)

    monkeypatch.setattr(ZCache, "file_encoded", file_encoded)
    return sizes


async def test_bulk_waits_while_a_small_call_is_pending(
    engine: ZCache, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = filed_chunks(monkeypatch)
    small_first = SmallFirst(hold=BOUND, lately=0.0)
    chunked = ChunkedEngine(engine, small_first=small_first)
    pool = engine.create_pool(PoolKind.PERSISTENT)
    keys = [(1, i) for i in range(64)]
    pages = compressible_pages[:64]
    small_first.arrive()
    bulk = asyncio.create_task(chunked.put_batch(pool, keys, pages))
    for _ in range(STEPS):
        await asyncio.sleep(0)
    assert sizes == [] and not bulk.done()  # no chunk before the small call is done
    small_first.leave()
    await asyncio.wait_for(bulk, BOUND)
    assert sizes == [CHUNK_PAGES] * (64 // CHUNK_PAGES)  # usual chunks: `lately` is over
    assert engine.get_batch(pool, keys) == pages


async def test_bulk_chunks_are_small_while_small_calls_come(
    engine: ZCache, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = filed_chunks(monkeypatch)
    small_first = SmallFirst(hold=BOUND, lately=BOUND)
    chunked = ChunkedEngine(engine, small_first=small_first)
    pool = engine.create_pool(PoolKind.PERSISTENT)
    keys = [(1, i) for i in range(64)]
    pages = compressible_pages[:64]
    small_first.arrive()
    small_first.leave()
    assert await chunked.put_batch(pool, keys, pages) == engine.put_batch(pool, keys, pages)
    assert max(sizes) == LATELY_CHUNK_PAGES and sum(sizes) == 64
    assert engine.get_batch(pool, keys) == pages


async def test_bulk_leaves_the_codec_workers_while_small_calls_come(
    engine: ZCache, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker takes a core that the small calls' threads need: while they come, bulk is coded
    on the loop in small chunks, the workers' chunks filed first; then it goes back to them."""
    sizes = filed_chunks(monkeypatch)
    clock = [0.0]
    small_first = SmallFirst(hold=BOUND, lately=1.0, clock=lambda: clock[0])
    workers = CodecWorkers(1)
    handed: list[int] = []
    to_workers = workers.encode

    def encode(encoder: Any, keys: Any, pages: Any) -> asyncio.Future[Encodings]:
        handed.append(len(keys))
        if len(handed) == 2:  # the second chunk is with the workers: small calls start
            small_first.arrive()
            small_first.leave()
        return to_workers(encoder, keys, pages)

    monkeypatch.setattr(workers, "encode", encode)
    chunked = ChunkedEngine(engine, workers=workers, small_first=small_first)
    pool = engine.create_pool(PoolKind.PERSISTENT)
    keys = [(1, i) for i in range(4 * WORKER_CHUNK_PAGES)]
    pages = (compressible_pages * 4)[: len(keys)]
    await chunked.put_batch(pool, keys[:-WORKER_CHUNK_PAGES], pages[:-WORKER_CHUNK_PAGES])
    on_loop = [LATELY_CHUNK_PAGES] * (WORKER_CHUNK_PAGES // LATELY_CHUNK_PAGES)  # the third
    assert handed == [WORKER_CHUNK_PAGES] * 2
    assert sizes == [WORKER_CHUNK_PAGES] * 2 + on_loop
    clock[0] += 1.0  # no small call for `lately`: back to the workers
    await chunked.put_batch(pool, keys[-WORKER_CHUNK_PAGES:], pages[-WORKER_CHUNK_PAGES:])
    assert handed == [WORKER_CHUNK_PAGES] * 3 and sizes[-1] == WORKER_CHUNK_PAGES
    assert engine.get_batch(pool, keys) == pages
    workers.shutdown()


async def test_a_call_that_never_ends_stops_counting_after_hold() -> None:
    small_first = SmallFirst(hold=BOUND)
    small_first.arrive()  # a call that never reaches its handler
    small_first.arrived -= BOUND  # ... arrived a hold ago
    small_first.arrive()
    small_first.leave()
    assert small_first.pending == 0
    await asyncio.wait_for(small_first.bulk_step(), BOUND)  # no pending call: one step only


async def test_after_a_wait_bulk_runs_as_long_before_it_waits_again() -> None:
    now = [100.0]  # the clock, in seconds
    small_first = SmallFirst(hold=BOUND, lately=BOUND, clock=lambda: now[0])
    small_first.arrive()
    step = asyncio.create_task(small_first.bulk_step())
    for _ in range(STEPS):
        await asyncio.sleep(0)
    assert not step.done()  # it waits for the pending call
    now[0] += 1.0  # which takes a second
    small_first.leave()
    await asyncio.wait_for(step, BOUND)
    small_first.arrive()  # the next call comes at once (a flood of them)
    await asyncio.wait_for(small_first.bulk_step(), BOUND)  # bulk goes on: it waited a second
    now[0] += 1.0  # bulk has run as long as it waited
    step = asyncio.create_task(small_first.bulk_step())
    for _ in range(STEPS):
        await asyncio.sleep(0)
    assert not step.done()  # so it waits again
    small_first.leave()
    await asyncio.wait_for(step, BOUND)


async def test_bulk_steps_give_their_core_away_while_small_calls_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yields: list[None] = []
    monkeypatch.setattr(cores.os, "sched_yield", lambda: yields.append(None))
    now = [100.0]  # the clock, in seconds
    small_first = SmallFirst(hold=0.0, lately=1.0, clock=lambda: now[0])
    now[0] += 2.0
    await small_first.bulk_step()
    assert yields == []  # no small call lately: bulk keeps its core
    small_first.arrive()
    small_first.leave()
    await small_first.bulk_step()
    assert len(yields) == 1  # a small call came: the core goes to whoever waits for it
    now[0] += cores.YIELD_EVERY / 2
    await small_first.bulk_step()
    assert len(yields) == 1  # but at most once every YIELD_EVERY
    now[0] += cores.YIELD_EVERY
    await small_first.bulk_step()
    assert len(yields) == 2
    now[0] += 1.0
    await small_first.bulk_step()
    assert len(yields) == 2  # `lately` is over


async def test_a_single_get_goes_ahead_of_a_big_batch(
    node: Node, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    node.small_first.hold = node.small_first.lately = BOUND
    count = 4 * PART_PAGES
    pages = [compressible_pages[i % len(compressible_pages)] for i in range(count)]
    async with AsyncClient(node.target, timeout=BOUND) as client:
        pool = await client.create_pool()
        await client.put(pool, 7, 0, pages[1])
        sizes = filed_chunks(monkeypatch)
        arrived = asyncio.Event()
        second_part = asyncio.Event()
        at_arrival: list[int] = []
        at_handler: list[int] = []
        parts = 0
        arrive, get, put_runs = SmallFirst.arrive, TmemServicer._get_page, ChunkedEngine.put_runs

        def arriving(small_first: SmallFirst) -> None:
            at_arrival.append(len(sizes))
            arrived.set()
            arrive(small_first)

        async def getting(
            servicer: TmemServicer, pool: int, oid: int, index: int, exclusive: bool
        ) -> bytes | PageError | None:
            at_handler.append(len(sizes))
            return await get(servicer, pool, oid, index, exclusive)

        async def putting(
            chunked: ChunkedEngine,
            pool: int,
            keys: list[tuple[int, int]],
            runs: Sequence[bytes | memoryview],
        ) -> list[PutResult]:
            nonlocal parts
            parts += 1
            if parts == 2:  # the batch's second part goes on once the get has arrived
                second_part.set()
                await arrived.wait()
            return await put_runs(chunked, pool, keys, runs)

        monkeypatch.setattr(SmallFirst, "arrive", arriving)
        monkeypatch.setattr(TmemServicer, "_get_page", getting)
        monkeypatch.setattr(ChunkedEngine, "put_runs", putting)
        batch = asyncio.create_task(client.put_batch(pool, KeyRange(1, 0, count), pages))
        await asyncio.wait_for(second_part.wait(), BOUND)
        assert await client.get(pool, 7, 0) == pages[1]
        await asyncio.wait_for(batch, BOUND)
        assert sum(sizes) == count and len(at_arrival) == len(at_handler) == 1
        assert at_arrival == at_handler  # no bulk chunk from the get's arrival to its handler
        assert max(sizes[at_arrival[0] :]) <= LATELY_CHUNK_PAGES  # small chunks after it
        got = await client.get_batch(pool, KeyRange(1, 0, count))
        assert got.pages == pages
