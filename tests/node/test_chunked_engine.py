# ChunkedEngine, with and without codec workers: big batches give the same answers as the engine's
# own batch calls, codec work runs in the workers and every state change on the loop's thread,
# small calls are served while a big batch runs, a batch that arrives late is not queued behind a
# running one, a cancelled batch leaves the engine consistent, and puts and gets reach the workers
# in hops of their own sizes.
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from node.codecworkers import CodecWorkers
from node.engine import (
    DEPTH,
    FLUSHES_PER_PUT,
    INLINE_PAGES,
    SHARED_PAGES,
    ChunkedEngine,
    CodecError,
    build_engine,
    codec_workers,
)
from node.fairness import SmallFirst
from ramster.zcache import (
    PAGE_SIZE,
    Encodings,
    InvalidPage,
    PageEncoder,
    PoolKind,
    SealedPages,
    ZCache,
    ZCacheConfig,
)
from tests.node.conftest import node_settings

P = PoolKind.PERSISTENT


def big_batch(
    pages: list[bytes], oid: int, count: int
) -> tuple[list[tuple[int, int]], list[bytes]]:
    """`count` keys of one object over the sample pages, with same-filled pages among them."""
    chosen = [pages[i % len(pages)] if i % 10 else bytes(PAGE_SIZE) for i in range(count)]
    return [(oid, i) for i in range(count)], chosen


class Recording:
    """Codec workers in one Python thread (node.engine.Workers) that record which work ran, in
    order; the work submitted `hold`-th (from 0) waits, once running, until `release` is set;
    the work submitted `fail`-th raises."""

    def __init__(self, hold: int | None = None, fail: int | None = None) -> None:
        self.inner = ThreadPoolExecutor(1)
        self.ran: list[str] = []
        self.hold, self.fail = hold, fail
        self.holding = threading.Event()
        self.release = threading.Event()
        self.label = ""  # what the next submitted work is recorded as
        self.submitted: list[str] = []
        self.threads: set[int] = set()

    def encode(
        self, encoder: PageEncoder, keys: Sequence[tuple[int, int]], pages: Sequence[Any]
    ) -> asyncio.Future[Encodings]:
        return self._submit(lambda: encoder.encode(keys, pages))

    def open(self, sealed: SealedPages) -> asyncio.Future[SealedPages]:
        return self._submit(sealed.open)

    def _submit(self, work: Callable[[], Any]) -> asyncio.Future[Any]:
        label, number = self.label, len(self.submitted)
        self.submitted.append(label)

        def run() -> Any:
            if number == self.hold:
                self.holding.set()
                self.release.wait()
            self.threads.add(threading.get_ident())
            self.ran.append(label)
            if number == self.fail:
                raise MemoryError("no room for the chunk's output")
            return work()

        return asyncio.wrap_future(self.inner.submit(run))

    def shutdown(self) -> None:
        self.inner.shutdown()


@pytest.fixture
def engine() -> Iterator[ZCache]:
    cache = ZCache(ZCacheConfig(pool_limit_frames=8192))
    yield cache
    cache.close()


@pytest.mark.parametrize("threads", [0, 2])
async def test_big_batches_match_the_engine(
    engine: ZCache, sample_pages: list[bytes], threads: int
) -> None:
    workers = CodecWorkers(threads) if threads else None
    chunked = ChunkedEngine(engine, workers=workers)
    reference = ZCache(ZCacheConfig(pool_limit_frames=8192))
    for cache in (engine, reference):
        cache.create_pool(P, store_raw=True)
        cache.create_pool(P)
    for pool in (0, 1):
        keys, pages = big_batch(sample_pages, 5, 3 * chunked.chunk + 7)
        keys[chunked.chunk - 1] = keys[3]  # a key twice in a chunk: the later page wins
        expected = reference.put_batch(pool, keys, pages)
        assert await chunked.put_batch(pool, keys, pages) == expected
        asked = [*keys, (5, 10**6), (6, 0)]  # and misses
        assert await chunked.get_batch(pool, asked, False) == reference.get_batch(pool, asked)
        taken = await chunked.get_batch(pool, asked, True)
        assert taken == reference.get_batch(pool, asked, True)
    assert engine.stats == reference.stats
    engine.verify()
    if workers:
        workers.shutdown()


@pytest.mark.parametrize("threads", [0, 1])
async def test_pages_in_runs_are_put_as_the_same_pages_one_by_one(
    engine: ZCache, sample_pages: list[bytes], threads: int
) -> None:
    """put_runs: runs of whole pages (of every length, cut by chunks and hops anywhere) store
    what put_batch stores from the same pages one by one; a batch of INLINE_PAGES too."""
    workers = CodecWorkers(threads) if threads else None
    chunked = ChunkedEngine(engine, workers=workers, hop=3 * INLINE_PAGES + 1)
    reference = ZCache(ZCacheConfig(pool_limit_frames=8192))
    pool = engine.create_pool(P, store_raw=True)
    reference.create_pool(P, store_raw=True)
    keys, pages = big_batch(sample_pages, 2, 7 * chunked.hop + 5)
    lengths = [1, 5, chunked.hop, 2 * chunked.hop + 3, 64, 1, 3]
    lengths.append(len(pages) - sum(lengths))
    runs: list[bytes | memoryview] = []
    at = 0
    for n, length in enumerate(lengths):
        run = b"".join(pages[at : at + length])
        runs.append(run if n % 2 else memoryview(bytearray(run)))
        at += length
    assert await chunked.put_runs(pool, keys, runs) == reference.put_batch(pool, keys, pages)
    few = [(3, i) for i in range(INLINE_PAGES)]
    assert await chunked.put_runs(pool, few, [b"".join(pages[:INLINE_PAGES])]) == (
        reference.put_batch(pool, few, pages[:INLINE_PAGES])
    )
    for cache in (engine, reference):
        assert cache.get_batch(pool, keys + few) == pages + pages[:INLINE_PAGES]
    assert engine.stats == reference.stats
    engine.verify()
    if workers:
        workers.shutdown()


async def test_codec_in_workers_state_on_the_loop(
    engine: ZCache, sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = Recording()
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P, store_raw=True)
    loop_thread = threading.get_ident()
    seen: set[int] = set()
    for name in ("file_encoded", "read_sealed", "opened"):
        method = getattr(engine, name)

        def spy(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            seen.add(threading.get_ident())
            return _method(*args, **kwargs)

        monkeypatch.setattr(engine, name, spy)
    keys, pages = big_batch(sample_pages, 1, 4 * chunked.chunk)
    await chunked.put_batch(pool, keys, pages)
    assert await chunked.get_batch(pool, keys, False) == pages
    assert seen == {loop_thread}
    assert len(workers.ran) == 8 and loop_thread not in workers.threads
    workers.shutdown()


async def test_puts_and_gets_hop_to_the_workers_in_their_own_sizes(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    workers = Recording()
    chunked = ChunkedEngine(engine, workers=workers, hop=16, get_hop=48)
    pool = engine.create_pool(P, store_raw=True)
    keys, pages = big_batch(sample_pages, 1, 96)
    workers.label = "put"
    await chunked.put_batch(pool, keys, pages)
    workers.label = "get"
    assert await chunked.get_batch(pool, keys, False) == pages
    assert workers.ran == ["put"] * 6 + ["get"] * 2
    workers.shutdown()


@pytest.mark.parametrize("threads", [0, 2])
async def test_small_calls_are_served_while_a_big_batch_runs(
    engine: ZCache, sample_pages: list[bytes], threads: int
) -> None:
    workers = CodecWorkers(threads) if threads else None
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P)
    await chunked.put_batch(pool, [(9, 0)], sample_pages[:1])
    keys, pages = big_batch(sample_pages, 1, 4096)
    bulk = asyncio.create_task(chunked.put_batch(pool, keys, pages))
    gaps = []  # pages the big batch filed between two small calls
    last = engine.stats.puts
    while not bulk.done():
        assert await chunked.get_batch(pool, [(9, 0)], False) == sample_pages[:1]
        gaps.append(engine.stats.puts - last)
        last = engine.stats.puts
        await asyncio.sleep(0)
    await bulk
    gaps.append(engine.stats.puts - last)  # its last chunk may end the batch in the same step
    assert sum(gaps) == 4096
    assert max(gaps) <= 2 * chunked.chunk  # a chunk per loop turn, before or after ours
    if workers:
        workers.shutdown()


async def test_an_object_is_flushed_a_few_chunks_per_loop_turn(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    """FlushObject of a big object (and so DestroyPool) leaves the loop between steps: in one
    call, 512k pages stalled it 1.4 s."""
    chunked = ChunkedEngine(engine)
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 4096)
    await chunked.put_batch(pool, keys, pages)
    held = engine.pool_pages(pool)  # the pages that compress (or are same-filled)
    await chunked.put_batch(pool, [(2, 5)], sample_pages[:1])  # another object, kept
    flush = asyncio.create_task(chunked.flush_object(pool, 1))
    gaps = []  # pages flushed between two turns of this task
    last = engine.stats.flushes
    while not flush.done():
        gaps.append(engine.stats.flushes - last)
        last = engine.stats.flushes
        await asyncio.sleep(0)
    assert await flush == held and engine.stats.flushes == held > 3000
    per_step = max(1, chunked.chunk * FLUSHES_PER_PUT // 64) * 64
    assert len(gaps) > 4096 // per_step // 2 and max(gaps) <= 2 * per_step
    assert engine.object_ids(pool) == [2] and engine.pool_pages(pool) == 1
    assert await chunked.flush_object(pool, 1) == 0
    assert await chunked.destroy_pool(pool) == 1 and not engine.has_pool(pool)


async def test_a_late_batch_is_not_queued_behind_a_running_one(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    workers = Recording(hold=0)
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P)
    workers.label = "big"
    keys, pages = big_batch(sample_pages, 1, 16 * chunked.chunk)
    big = asyncio.create_task(chunked.put_batch(pool, keys, pages))
    while len(workers.submitted) < DEPTH:  # the big batch has its fill with the workers
        await asyncio.sleep(0)
    workers.label = "late"
    small_keys, small_pages = big_batch(sample_pages, 2, INLINE_PAGES + 1)
    late = asyncio.create_task(chunked.put_batch(pool, small_keys, small_pages))
    while "late" not in workers.submitted:
        await asyncio.sleep(0)
    workers.label = "big"
    workers.release.set()
    await asyncio.gather(big, late)
    assert workers.ran.index("late") == DEPTH  # behind the DEPTH chunks queued before it only
    assert len(workers.ran) == 17
    workers.shutdown()


async def test_a_malformed_big_batch_changes_nothing(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    chunked = ChunkedEngine(engine)
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 3 * chunked.chunk)
    pages[-1] = pages[-1][:100]
    with pytest.raises(InvalidPage):
        await chunked.put_batch(pool, keys, pages)
    assert engine.stored_pages == 0 and engine.stats.puts == 0


async def test_a_cancelled_batch_leaves_the_engine_consistent(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    workers = Recording(hold=DEPTH)  # the first chunk sent while others are filed
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 4096)
    bulk = asyncio.create_task(chunked.put_batch(pool, keys, pages))
    await asyncio.to_thread(workers.holding.wait)
    bulk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bulk
    filed, stored = engine.stats.puts, engine.stored_pages
    assert 0 < filed < 4096
    workers.release.set()
    await asyncio.wrap_future(workers.inner.submit(int))  # the held chunk has run in the worker
    assert len(workers.ran) == DEPTH + 1
    assert (engine.stats.puts, engine.stored_pages) == (filed, stored)  # and changed nothing
    engine.verify()
    workers.shutdown()


def test_an_engine_has_the_workers_its_settings_ask_for(tmp_path: Path) -> None:
    engine = build_engine(node_settings(tmp_path / "a", worker_threads=3))
    workers = codec_workers(engine)
    assert isinstance(workers, CodecWorkers) and workers.threads == 3
    assert ChunkedEngine(engine).workers is ChunkedEngine(engine).workers is workers
    alone = build_engine(node_settings(tmp_path / "b"))  # 0: slices on the loop
    assert codec_workers(alone) is None and ChunkedEngine(alone).workers is None
    for built in (engine, alone):
        built.close()


async def test_a_failed_chunk_fails_its_batch_as_a_codec_error(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    workers = Recording(fail=1)
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 4 * chunked.chunk)
    with pytest.raises(CodecError, match="a codec worker failed: MemoryError"):
        await chunked.put_batch(pool, keys, pages)
    assert engine.stats.puts == chunked.chunk  # the chunk before it was filed, none after
    engine.verify()
    workers.shutdown()


async def test_workers_shut_down_fail_a_batch_as_a_codec_error(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    workers = CodecWorkers(1)
    chunked = ChunkedEngine(engine, workers=workers)
    pool = engine.create_pool(P)
    workers.shutdown()
    keys, pages = big_batch(sample_pages, 1, 4 * chunked.chunk)
    with pytest.raises(CodecError, match="no codec worker: the codec pool is closed"):
        await chunked.put_batch(pool, keys, pages)
    assert engine.stats.puts == 0


async def test_batches_encoded_ahead_are_filed_in_their_turn(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    """encode_ahead hands every hop of a batch to the workers and files nothing; put_runs with
    it files those very hops in the batch's turn, so batches take effect in the order filed even
    when the later one was encoded first, exactly as plain put_runs would have them."""
    workers = Recording()
    chunked = ChunkedEngine(engine, workers=workers, hop=32)
    reference = ZCache(ZCacheConfig(pool_limit_frames=8192))
    pool = engine.create_pool(P, store_raw=True)
    reference.create_pool(P, store_raw=True)
    keys, first = big_batch(sample_pages, 1, 96)
    second = first[1:] + first[:1]  # the same keys, other pages: the later batch must win
    workers.label = "second"
    ahead = chunked.encode_ahead(pool, keys, [b"".join(second)])
    assert ahead is not None and workers.submitted == ["second"] * 3  # all its hops, at once
    assert engine.stats.puts == 0  # nothing filed yet
    workers.label = "first"
    results = [await chunked.put_runs(pool, keys, [b"".join(first)])]
    results.append(await chunked.put_runs(pool, keys, [b"".join(second)], ahead))
    assert workers.submitted == ["second"] * 3 + ["first"] * 3  # the second was not coded again
    assert results == [reference.put_batch(pool, keys, pages) for pages in (first, second)]
    assert engine.stats == reference.stats
    assert engine.get_batch(pool, keys) == second
    engine.verify()
    workers.shutdown()


async def test_hops_are_smaller_while_small_calls_come_and_ahead_keeps_its_own(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    """A put's hops to the workers are SHARED_PAGES at most while small calls come (each hop is
    filed in one loop step); a batch encoded ahead is filed in the hops it was started with,
    whatever comes meanwhile, so none is coded twice."""
    workers = Recording()
    small_first = SmallFirst(lately=60.0)
    chunked = ChunkedEngine(engine, workers=workers, hop=2 * SHARED_PAGES, small_first=small_first)
    reference = ZCache(ZCacheConfig(pool_limit_frames=8192))
    pool = engine.create_pool(P, store_raw=True)
    reference.create_pool(P, store_raw=True)
    keys, pages = big_batch(sample_pages, 1, 4 * SHARED_PAGES)
    quiet = chunked.encode_ahead(pool, keys, [b"".join(pages)])
    assert quiet is not None and len(workers.submitted) == 2  # hops of 2 * SHARED_PAGES
    small_first.arrive()
    small_first.leave()
    busy = chunked.encode_ahead(pool, keys, [b"".join(pages[::-1])])
    assert busy is not None and len(workers.submitted) == 2 + 4  # of SHARED_PAGES
    results = [await chunked.put_runs(pool, keys, [b"".join(pages)], quiet)]  # calls come now
    results.append(await chunked.put_runs(pool, keys, [b"".join(pages[::-1])], busy))
    assert len(workers.submitted) == 6  # each batch filed from its own hops, none coded again
    assert results == [reference.put_batch(pool, keys, p) for p in (pages, pages[::-1])]
    assert engine.get_batch(pool, keys) == pages[::-1]
    engine.verify()
    workers.shutdown()


async def test_encoding_ahead_is_only_for_batches_the_workers_take(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 64)
    runs = [b"".join(pages)]
    assert ChunkedEngine(engine).encode_ahead(pool, keys, runs) is None  # no workers
    workers = Recording()
    offloading = ChunkedEngine(engine, workers=workers, offload=65)
    assert offloading.encode_ahead(pool, keys, runs) is None  # kept on the loop
    few = keys[:INLINE_PAGES]
    assert ChunkedEngine(engine, workers=workers).encode_ahead(pool, few, runs) is None
    assert workers.submitted == []
    workers.shutdown()


async def test_an_encoding_ahead_dropped_or_failed_files_nothing_more(
    engine: ZCache, sample_pages: list[bytes]
) -> None:
    """Dropped unused, its hops are cancelled and nothing is filed; a batch whose encoding
    ahead fails in a worker fails as a CodecError after filing the hops before, and the hops
    after are cancelled."""
    workers = Recording(fail=4)
    chunked = ChunkedEngine(engine, workers=workers, hop=32)
    pool = engine.create_pool(P)
    keys, pages = big_batch(sample_pages, 1, 96)
    dropped = chunked.encode_ahead(pool, keys, [b"".join(pages)])
    assert dropped is not None
    futures = list(dropped.futures.values())
    dropped.drop()
    assert all(f.cancelled() for f in futures) and not dropped.futures
    failing = chunked.encode_ahead(pool, keys, [b"".join(pages)])  # its second hop fails
    assert failing is not None
    with pytest.raises(CodecError, match="a codec worker failed: MemoryError"):
        await chunked.put_runs(pool, keys, [b"".join(pages)], failing)
    assert engine.stats.puts == 32 and not failing.futures
    engine.verify()
    workers.shutdown()
