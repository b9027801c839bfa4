# The node's one engine: built here from the settings, driven from the event loop in slices,
# with the codec work of big batches optionally in worker threads.
#
# build_engine() is the only place a ZCache is constructed (the reaper, pool limit hysteresis
# and backing file under the data directory plug in here), and it gives the engine its codec
# workers: with `worker_threads` > 0, a pool of that many threads, one per engine, shared by
# every front door that drives it (gRPC, NBD).  Unset, a node that serves NBD gets NBD_WORKERS
# (2: on 2 cores its sequential writes ran at 1.6x the loop alone's, 0.28x nbdkit's against
# 0.18x), any other none (codec_threads).  The engine is synchronous and not thread-safe,
# so every change to its state runs on the event-loop thread; only the pure halves of its batch
# paths (ZCache: encode a put, open a get) may run in the workers.
#
# ChunkedEngine runs a batch as chunks and yields to the loop before each (through
# node.fairness.SmallFirst when the node has one: it waits for small calls being served, and
# without workers makes the chunks a page while small calls come), so what a small call can wait
# behind is one chunk, not a batch of up to 4096 pages (~80 ms).  Without workers a chunk is
# CHUNK_PAGES pages run whole on the loop (~0.2 ms of puts; a get chunk is the engine's own
# get_batch, which opens zpages in place, in the arena, with no copy).  With workers it is
# WORKER_CHUNK_PAGES pages through a short pipeline: a put chunk is encoded in a worker and then
# filed on the loop; a get chunk is read out on the loop, opened in a worker, then counted on the
# loop; up to DEPTH chunks of a batch are with the workers at once, so the loop files chunk n
# while chunk n+1 compresses.  Batches of up to INLINE_PAGES pages (single gets, NBD's 4 KiB
# requests) always run at once on the loop.  A front door may keep smaller batches than `offload`
# pages on the loop (where a hop costs more than it saves) and hand the workers `hop` pages at a
# time, more than a loop step, and `get_hop` pages of a get: NBD hands them a quarter of a write
# group per hop, a whole read group (node/nbd/server.py).  A put's hop is filed in one loop
# step, so while small calls come it is SHARED_PAGES at most: with NBD's 256-page hops, gRPC
# put+get pairs sent during nbdcopy rewrites took p99 24-30 ms against 18-20 with 128-page ones
# (2 cores shared with the client).  A page that is a view (of a request's
# bytes, which nothing writes meanwhile) is compressed where it is, never copied first; put_runs
# takes the pages of a front door's requests as they came, runs of pages back to back (an NBD
# write's payload, a PutBatch's blob), and hands the codec a chunk's runs cut at its ends, not a
# view per page (~0.3 us of the loop's time each, 6-8% of what the loop spent per page on
# NBD writes).  A front door that knows its next batches can start their encoding early
# (encode_ahead: every hop of a batch to the workers at once, nothing filed) and hand what it
# started to put_runs in the batch's turn, which files those hops in order as they come and
# drops any it did not use: the workers code the next batches while the loop files this one
# (NBD connections do, node/nbd/connection.py).  Either way a get batch's remote copies are
# fetched once, before its first chunk; a chunk looks again only once the prefetch's check says
# a local copy went meanwhile.
#
# The workers are native threads that never take the GIL (node/codecworkers.py): a chunk costs
# the loop its submission and its results, and a worker never waits for the loop.
#
# A worker takes a core, which the threads of small calls need: measured on 2 cores shared with
# the clients (`ramster bench latency` against a node with and without one, alternating), a
# worker that kept coding bulk while single gets came moved 40-65% more bulk pages but raised the
# single-get p50 under that load from 0.8-0.87 ms to 1.3-1.4 and its p99 from 2.3-3.9 to
# 3.2-5.4.  So while small calls come (node.fairness.SmallFirst.coming), bulk leaves the workers
# and is coded on the loop in SmallFirst's small chunks, as without workers (the workers' chunks
# in flight are filed first: chunks finish in order); measured so, the loaded p50 was 0.74-0.86
# ms with a worker and 0.77-0.92 without.  Why no workers by default all the same: with gRPC's
# bulk batches alone, a worker's gain was lost in this machine's noise (aggregate put and get
# pages/s of 1-4 clients within +-20% either way).  NBD requests are all big batches and its
# clients want throughput: there one worker moves 10-20% more sequential writes and 1.5-2x the
# reads, two a few % more writes still (`ramster bench nbd`, which runs its node with two);
# `--worker-threads` turns them on.
#
# Fairness: the loop runs ready tasks in turn, one step each, and a batch's step is one chunk,
# so concurrent batches advance chunk by chunk, round-robin, whoever sent them.  With workers,
# which take chunks first come first served, a batch never has more than DEPTH chunks queued,
# so a batch that arrives waits behind at most DEPTH chunks of each batch already running.  A
# Stream RPC runs its requests one at a time, so one client's stream is one batch at a time,
# however deep its client pipelines.
#
# Each page's operation is atomic, a batch as a whole is not (keys and pages are checked before
# the first chunk, so a malformed batch still changes nothing).  A get's zpages are copied out
# of their frames before a worker opens them, since the loop may free and reuse a frame
# meanwhile.  Destroying a big pool is cut up too: its objects are flushed a few at a time, then
# the empty pool goes.
from __future__ import annotations

import asyncio
import os
import weakref
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import accumulate
from typing import Protocol, TypeVar

from node.codecworkers import CodecWorkers
from node.fairness import SmallFirst
from node.settings import NBD_WORKERS, Settings
from ramster.wire import byte_size, page_views
from ramster.zcache import (
    PAGE_SIZE,
    Encodings,
    PageEncoder,
    PageError,
    PoolKind,
    PutResult,
    SealedPages,
    ZCache,
    ZCacheConfig,
    ZCacheError,
    check_keys,
    check_put_batch,
)
from ramster.zcache.backing import BackingFile
from ramster.zcache.evictor import Evictor
from ramster.zcache.index import CHUNK as INDEX_CHUNK

BACKING_FILE = "backing.dat"
CHUNK_PAGES = 8  # a slice on the loop: ~0.2 ms of puts
WORKER_CHUNK_PAGES = 32  # with workers: a thread hop (~40 us of the loop's time) per chunk
DEPTH = 2  # chunks of one batch with the workers at once
INLINE_PAGES = 8  # batches this small run on the loop, codec included
SHARED_PAGES = 128  # the most pages of a put's hop while small calls come (~0.5 ms to file)
FLUSHES_PER_PUT = 8  # a flush costs about an eighth of a put
X = TypeVar("X")
Y = TypeVar("Y")
T = TypeVar("T")
# fetches the remote copies a get of some keys needs; then, if it got them all, a check that
# stays true while they (or any of those keys' copies) are still local (node/driver.py)
Prefetch = Callable[[int, list[tuple[int, int]]], Awaitable[Callable[[], bool] | None]]


class Workers(Protocol):
    """Where the codec halves of big batches run off the loop (node.codecworkers.CodecWorkers)."""

    def encode(
        self,
        encoder: PageEncoder,
        keys: Sequence[tuple[int, int]],
        pages: Sequence[bytes | memoryview],
    ) -> asyncio.Future[Encodings]: ...

    def open(self, sealed: SealedPages) -> asyncio.Future[SealedPages]: ...

    def shutdown(self) -> None: ...


_WORKERS: weakref.WeakKeyDictionary[ZCache, Workers] = weakref.WeakKeyDictionary()


class CodecError(ZCacheError):
    """A codec worker failed to encode or open a chunk of a batch (or none was left to): the
    chunks before it took effect, the rest did not."""


def build_engine(
    settings: Settings,
    evictor: Evictor | None = None,
    pools: Iterable[tuple[int, PoolKind, str, bool | None]] = (),
) -> ZCache:
    """The engine under the pool limit, with `evictor` as its backdoor exit (the backing file,
    or the chain [ramster layer, backing file]); it recreates `pools` (the registry's) and
    then adopts what the evictor kept from before.  Its codec workers, if any, are made here."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = ZCacheConfig(
        pool_limit_frames=max(1, settings.pool_limit // PAGE_SIZE),
        default_allocator=settings.allocator,
    )
    engine = ZCache(config, evictor=evictor, pools=pools)
    if threads := codec_threads(settings):
        give_codec_workers(engine, threads)
    return engine


def codec_threads(settings: Settings, cores: int | None = None) -> int:
    """The codec worker threads the settings ask for: --worker-threads, else (auto)
    NBD_WORKERS for a node that serves NBD exports, at most `cores` (those this process may
    use) and none on one core, and none for any other node."""
    if settings.worker_threads is not None:
        return settings.worker_threads
    if not (settings.nbd_listen and settings.nbd_export):
        return 0
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return min(NBD_WORKERS, cores) if cores > 1 else 0


def give_codec_workers(engine: ZCache, threads: int) -> Workers:
    """Give `engine` `threads` codec workers (build_engine does, from the settings)."""
    workers = _WORKERS[engine] = CodecWorkers(threads)
    return workers


def codec_workers(engine: ZCache) -> Workers | None:
    """The threads that encode and open big batches of `engine`, if build_engine gave it any
    (they live until stop_codec_workers, which the node calls on its way down)."""
    return _WORKERS.get(engine)


def stop_codec_workers(engine: ZCache) -> None:
    """Shut `engine`'s codec threads down and wait for them (work not started is dropped: the
    front doors are closed by then)."""
    workers = _WORKERS.pop(engine, None)
    if workers is not None:
        workers.shutdown()


def open_backing(settings: Settings) -> BackingFile:
    """The node's swap disk: data_dir/backing.dat, found again across restarts."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return BackingFile(settings.data_dir / BACKING_FILE, limit_bytes=settings.backing_limit)


class ChunkedEngine:
    """Batch operations of an engine in chunks, with a yield to the loop after each; their codec
    work runs in `workers` (by default the engine's, if it has any), their state changes on the
    loop."""

    def __init__(
        self,
        engine: ZCache,
        chunk: int | None = None,
        prefetch: Prefetch | None = None,
        workers: Workers | None = None,
        offload: int = 0,
        hop: int | None = None,
        small_first: SmallFirst | None = None,
        get_hop: int | None = None,
    ) -> None:
        self.engine = engine
        self.prefetch = prefetch  # fetches remote copies a get is about to read
        self.workers = workers or codec_workers(engine)
        self.chunk = chunk or (WORKER_CHUNK_PAGES if self.workers else CHUNK_PAGES)
        self.hop = hop or self.chunk  # pages per hop to the workers ...
        self.get_hop = get_hop or self.hop  # ... of a get (its hop costs the loop a read-out)
        self.offload = offload  # a batch of fewer pages runs on the loop, `chunk` at a time
        self.small_first = small_first  # gives small calls way, if the node has one

    def _hop(self) -> int:
        """Pages of a put's hop to the workers, each filed in one loop step: `hop`, at most
        SHARED_PAGES while small calls come."""
        if self.small_first is not None and self.small_first.coming():
            return min(self.hop, SHARED_PAGES)
        return self.hop

    def _chunk(self) -> int:
        """The size of a chunk run on the loop: smaller while small calls come (chunks for
        workers keep theirs, or they would cost a thread hop a page)."""
        if self.small_first is None:
            return self.chunk
        return self.small_first.chunk(self.chunk)

    async def step(self) -> None:
        """A bulk task's yield between two steps (node.fairness.SmallFirst.bulk_step)."""
        if self.small_first is None:
            await asyncio.sleep(0)
        else:
            await self.small_first.bulk_step()

    async def put_batch(
        self,
        pool: int,
        keys: list[tuple[int, int]],
        pages: Sequence[bytes | memoryview],
        checked: bool = False,
    ) -> list[PutResult]:
        """Store pages under keys; every key and page is checked before the first chunk, unless
        the caller did (`checked`: keys passed check_keys, or were made from checked numbers,
        and every page is exactly PAGE_SIZE bytes, as the front doors' wire formats make them)."""
        if len(keys) <= INLINE_PAGES:
            return self.engine.put_batch(pool, keys, [bytes(p) for p in pages])
        if not checked:  # all, before a chunk is filed
            check_put_batch(keys, [p if type(p) is bytes else _page_shaped(p) for p in pages])
        return await self._put(pool, keys, pages.__getitem__)

    def encode_ahead(
        self, pool: int, keys: list[tuple[int, int]], runs: Sequence[bytes | memoryview]
    ) -> Ahead | None:
        """Start encoding a put_runs() batch in the workers now, every hop of it, for a
        put_runs() of the same batch (with `ahead`) to file later; None where that put_runs()
        would not use the workers.  Nothing is filed until then, so the engine's state and the
        order of puts are untouched; what put_runs() does not take is dropped (Ahead.drop)."""
        workers = self.workers
        if workers is None or len(keys) <= INLINE_PAGES or len(keys) < self.offload:
            return None
        encoder, cut, hop = self.engine.encoder(pool), _Runs(runs).cut, self._hop()
        futures: dict[int, asyncio.Future[Encodings]] = {}
        for first in range(0, len(keys), hop):
            part = slice(first, first + hop)
            try:
                futures[first] = workers.encode(encoder, keys[part], cut(part))
            except RuntimeError:  # the workers were shut down: put_runs() will say so
                break
        return Ahead(futures, hop)

    async def put_runs(
        self,
        pool: int,
        keys: list[tuple[int, int]],
        runs: Sequence[bytes | memoryview],
        ahead: Ahead | None = None,
    ) -> list[PutResult]:
        """put_batch() of checked keys and pages that lie back to back in `runs` (bytes or byte
        views of whole pages: a request's payload, a batch's blob), len(keys) pages in all.
        They are coded where they lie, a hop's pages in a few buffers, with no view per page;
        with `ahead` (encode_ahead() of this very batch), from the hops it started."""
        if len(keys) <= INLINE_PAGES:
            pages = [bytes(page) for run in runs for page in page_views(run, _pages_of(run))]
            return self.engine.put_batch(pool, keys, pages)
        return await self._put(pool, keys, _Runs(runs).cut, ahead)

    async def _put(
        self,
        pool: int,
        keys: list[tuple[int, int]],
        cut: Callable[[slice], Sequence[bytes | memoryview]],
        ahead: Ahead | None = None,
    ) -> list[PutResult]:
        """A checked put batch of more than INLINE_PAGES pages, chunk by chunk; `cut(part)` is
        the buffers that hold the pages of `part`; `ahead` holds hops already encoding."""
        engine = self.engine
        encoder, workers = engine.encoder(pool), self.workers

        # a page that is a view (of a request's bytes) is read as it is, never copied whole
        def encode_part(part: slice) -> Encodings:
            return encoder.encode(keys[part], cut(part))

        def offload_part(part: slice) -> asyncio.Future[Encodings]:
            started = ahead.take(part) if ahead is not None else None
            if started is not None:
                return started
            assert workers is not None
            return workers.encode(encoder, keys[part], cut(part))

        def file(part: slice, encoded: Encodings) -> list[PutResult]:
            return engine.file_encoded(pool, keys[part], encoded, keys_checked=True)

        try:
            hop = self._hop() if ahead is None else ahead.hop  # cut as the hops started
            return await self._pipelined(
                len(keys), _as_is, encode_part, offload_part, file, hop, ahead is not None
            )
        finally:
            if ahead is not None:
                ahead.drop()

    async def get_batch(
        self, pool: int, keys: list[tuple[int, int]], exclusive: bool
    ) -> list[bytes | PageError | None]:
        engine, prefetch = self.engine, self.prefetch
        if len(keys) <= INLINE_PAGES:
            if prefetch is not None:
                await prefetch(pool, keys)
            return engine.get_batch(pool, keys, exclusive)
        check_keys(keys)  # the whole batch, before any chunk is read (an exclusive get removes)
        local: Callable[[], bool] | None = None
        if prefetch is not None:  # the batch's remote copies in one go; chunks find them staged
            local = await prefetch(pool, keys)

        async def fetched(part: slice) -> None:
            """Before a chunk: its remote copies again, only once a local copy went."""
            nonlocal local
            if prefetch is not None and (local is None or not local()):
                local = None  # the batch's check holds no more; each chunk looks for itself
                await prefetch(pool, keys[part])

        if self.workers is None or len(keys) < self.offload:  # on the loop: opened in place

            async def get(part: slice) -> list[bytes | PageError | None]:
                await fetched(part)
                return engine.get_batch(pool, keys[part], exclusive)

            return await self._pipelined(len(keys), get, _same, None, _got, self.hop)

        async def read(part: slice) -> SealedPages:
            await fetched(part)
            return engine.read_sealed(pool, keys[part], exclusive)

        def count(part: slice, sealed: SealedPages) -> list[bytes | PageError | None]:
            return engine.opened(sealed)

        workers = self.workers
        assert workers is not None
        return await self._pipelined(
            len(keys), read, SealedPages.open, workers.open, count, self.get_hop
        )

    async def destroy_pool(self, pool: int) -> int:
        """Drop a pool, first flushing its objects a step at a time (flush_object): the
        engine's destroy_pool is one call of ~4 ms per 1000 pages.  Its pages count as
        flushes."""
        dropped = 0
        for oid in self.engine.object_ids(pool):
            dropped += await self.flush_object(pool, oid)
        return dropped + self.engine.destroy_pool(pool)

    async def flush_object(self, pool: int, oid: int) -> int:
        """The engine's flush_object() in steps (flush_keys), an index chunk's 64 keys at a
        time: in one call, an object of 512k pages stalled the loop 1.4 s, past the peers'
        timeouts.  The chunks are those the object has when it starts: a page put meanwhile,
        by a call that races this one, may or may not be flushed; one put after it returns
        stays.  How many pages went."""
        slots = range(INDEX_CHUNK)
        chunks = self.engine.object_chunks(pool, oid)
        return await self.flush_keys(
            pool, ([(oid, c * INDEX_CHUNK + s) for s in slots] for c in chunks)
        )

    async def flush_keys(self, pool: int, windows: Iterable[list[tuple[int, int]]]) -> int:
        """flush_pages() of the keys of `windows` (taken as they are needed), a loop chunk's
        worth of flushes per engine call at least, with a yield between two calls; how many
        held a page."""
        engine, keys, flushed, stepped = self.engine, list[tuple[int, int]](), 0, False
        for window in windows:
            keys += window
            if len(keys) >= self._chunk() * FLUSHES_PER_PUT:
                if stepped:
                    await self.step()
                flushed += engine.flush_pages(pool, keys)
                keys, stepped = [], True
        if keys:
            if stepped:
                await self.step()
            flushed += engine.flush_pages(pool, keys)
        return flushed

    async def _pipelined(
        self,
        count: int,
        start: Callable[[slice], Awaitable[X]],
        work: Callable[[X], Y],
        to_workers: Callable[[X], asyncio.Future[Y]] | None,
        finish: Callable[[slice, Y], list[T]],
        hop: int,
        started: bool = False,
    ) -> list[T]:
        """Per chunk of `count` items, in order: a yield (`step`), `start` on the loop, then its
        `work` in a worker (`to_workers`; `work` on the loop without workers or `to_workers`,
        for fewer than `self.offload` items, or while small calls come), `finish` on the loop;
        up to DEPTH chunks (of `hop` items) in the workers at once, each finished in a step of
        its own (`started`: the workers hold every hop already, so they keep them, small calls
        or not).  On an error or a cancellation, chunks still with the workers are dropped
        unfinished; a worker's failure is raised as a CodecError."""
        workers, small_first = self.workers, self.small_first
        if count < self.offload or to_workers is None:
            workers = None
        if started:
            small_first = None
        out: list[T] = []
        running: deque[tuple[slice, asyncio.Future[Y]]] = deque()

        async def finish_oldest() -> None:
            part, done = running.popleft()
            try:
                worked = await done
            except Exception as exc:  # the worker's failure is the batch's, as an engine error
                raise CodecError(f"a codec worker failed: {exc!r}") from exc
            out.extend(finish(part, worked))
            await self.step()  # `done` may have been ready already: yield all the same

        first = 0
        try:
            while first < count:
                await self.step()  # each chunk a step of its own, after any small call pending
                if workers is None or (small_first is not None and small_first.coming()):
                    while running:  # the workers' chunks first: chunks finish in order
                        await finish_oldest()
                    part = slice(first, first + self._chunk())
                    first = part.stop
                    out.extend(finish(part, work(await start(part))))
                    continue
                part = slice(first, first + hop)
                first = part.stop
                item = await start(part)
                assert to_workers is not None  # else no workers
                try:
                    running.append((part, to_workers(item)))
                except RuntimeError as exc:  # the workers were shut down
                    raise CodecError(f"no codec worker: {exc}") from exc
                if len(running) == DEPTH:
                    await finish_oldest()
            while running:
                await finish_oldest()
        finally:
            for _, left in running:
                left.cancel()
        return out


class Ahead:
    """The hops of a put batch that encode_ahead() started, by their first page, and their
    size (put_runs() cuts the batch the same way)."""

    def __init__(self, futures: dict[int, asyncio.Future[Encodings]], hop: int) -> None:
        self.futures = futures
        self.hop = hop

    def take(self, part: slice) -> asyncio.Future[Encodings] | None:
        """The started hop that is exactly `part`, if any (the caller now awaits it)."""
        return self.futures.pop(part.start, None)

    def drop(self) -> None:
        """Cancel the hops nobody took (a worker still codes them; the results are dropped)."""
        for future in self.futures.values():
            future.cancel()
        self.futures.clear()


async def _as_is(part: slice) -> slice:
    return part


def _same(item: X) -> X:
    return item


def _got(part: slice, pages: list[bytes | PageError | None]) -> list[bytes | PageError | None]:
    return pages


def _pages_of(run: bytes | memoryview) -> int:
    return byte_size(run) // PAGE_SIZE


class _Runs:
    """Pages back to back in a few buffers, cut by page numbers into the buffers (whole, or
    byte views of them) that hold a part's pages."""

    def __init__(self, runs: Sequence[bytes | memoryview]) -> None:
        self.runs = runs
        self.starts = list(accumulate(map(_pages_of, runs), initial=0))  # page of each run

    def cut(self, part: slice) -> list[bytes | memoryview]:
        runs, starts = self.runs, self.starts
        first, stop = part.start, min(part.stop, starts[-1])
        out: list[bytes | memoryview] = []
        at = bisect_right(starts, first) - 1
        while at < len(runs) and starts[at] < stop:
            begin, end = starts[at], starts[at + 1]
            if first <= begin and end <= stop:
                out.append(runs[at])
            else:
                lo, hi = max(first, begin) - begin, min(stop, end) - begin
                out.append(memoryview(runs[at]).cast("B")[lo * PAGE_SIZE : hi * PAGE_SIZE])
            at += 1
        return out


_SHAPE = bytes(PAGE_SIZE)


def _page_shaped(page: bytes | memoryview) -> bytes:
    """What the whole-batch check sees of `page` without copying it: itself if it is bytes, a
    blank page if it is a view of one page of bytes, else its bytes (which the check refuses)."""
    if isinstance(page, bytes):
        return page
    return _SHAPE if page.nbytes == PAGE_SIZE else bytes(page)
