# The node's one engine: built here from the settings, driven from the event loop in chunks.
#
# build_engine() is the only place a ZCache is constructed (the reaper, pool limit hysteresis
# and backing file under the data directory plug in here).  The engine is synchronous and not
# thread-safe, so the node calls it only from the event-loop thread; a batch of up to 4096 pages
# would hold the loop for ~80 ms, so batch calls go through ChunkedEngine, which feeds the engine
# CHUNK_PAGES pages at a time and yields to the loop between chunks.  A chunk is a few
# milliseconds of work: short enough that a single-page get never waits long behind a big batch,
# long enough that the yields cost nothing measurable.  Chunks of concurrent batches may
# interleave; each page's operation is atomic, a batch as a whole is not (keys and pages are
# checked before the first chunk, so a malformed batch still changes nothing).  Destroying a
# big pool is cut up too: its objects are flushed a few at a time, then the empty pool goes.
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from node.settings import Settings
from ramster.zcache import PAGE_SIZE, PageError, PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile
from ramster.zcache.evictor import Evictor

BACKING_FILE = "backing.dat"
CHUNK_PAGES = 128
FLUSHES_PER_PUT = 8  # a flush costs about an eighth of a put
T = TypeVar("T")
Prefetch = Callable[[int, list[tuple[int, int]]], Awaitable[None]]


def build_engine(
    settings: Settings,
    evictor: Evictor | None = None,
    pools: Iterable[tuple[int, PoolKind, str, bool | None]] = (),
) -> ZCache:
    """The engine under the pool limit, with `evictor` as its backdoor exit (the backing file,
    or the chain [ramster layer, backing file]); it recreates `pools` (the registry's) and
    then adopts what the evictor kept from before."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = ZCacheConfig(
        capacity_frames=max(1, settings.pool_limit // PAGE_SIZE),
        default_allocator=settings.allocator,
    )
    return ZCache(config, evictor=evictor, pools=pools)


def open_backing(settings: Settings) -> BackingFile:
    """The node's swap disk: data_dir/backing.dat, found again across restarts."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return BackingFile(settings.data_dir / BACKING_FILE, limit_bytes=settings.backing_limit)


class ChunkedEngine:
    """Batch operations of an engine, cut into chunks with a yield to the loop between them."""

    def __init__(
        self, engine: ZCache, chunk: int = CHUNK_PAGES, prefetch: Prefetch | None = None
    ) -> None:
        self.engine = engine
        self.chunk = chunk
        self.prefetch = prefetch  # fetches remote copies a get is about to read

    async def put_batch(
        self, pool: int, keys: list[tuple[int, int]], pages: list[bytes]
    ) -> list[PutResult]:
        put = self.engine.put_batch
        return await self._chunked(lambda part: put(pool, keys[part], pages[part]), len(keys))

    async def get_batch(
        self, pool: int, keys: list[tuple[int, int]], exclusive: bool
    ) -> list[bytes | PageError | None]:
        get = self.engine.get_batch
        if self.prefetch is None:
            return await self._chunked(lambda part: get(pool, keys[part], exclusive), len(keys))
        out: list[bytes | PageError | None] = []
        for start in range(0, len(keys), self.chunk):
            if start:
                await asyncio.sleep(0)
            part = keys[start : start + self.chunk]
            await self.prefetch(pool, part)
            out += get(pool, part, exclusive)
        return out

    async def destroy_pool(self, pool: int) -> int:
        """Drop a pool, first flushing its objects with a yield after every ~chunk of pages:
        the engine's destroy_pool is one call of ~4 ms per 1000 pages.  (One object is flushed
        in one call.)  Its pages count as flushes."""
        flush, step = self.engine.flush_object, self.chunk * FLUSHES_PER_PUT
        dropped = since_yield = 0
        for oid in list(self.engine.pool(pool).index.objects):
            if since_yield >= step:
                await asyncio.sleep(0)
                since_yield = 0
            flushed = flush(pool, oid)
            dropped += flushed
            since_yield += flushed
        return dropped + self.engine.destroy_pool(pool)

    async def _chunked(self, call: Callable[[slice], list[T]], count: int) -> list[T]:
        out: list[T] = []
        for start in range(0, count, self.chunk):
            if start:
                await asyncio.sleep(0)
            out += call(slice(start, start + self.chunk))
        return out


class BackingCollector:
    """The backing file's counters as metrics: write-back, errors, damage found."""

    def __init__(self, backing: BackingFile) -> None:
        self.backing = backing

    def collect(self) -> Iterator[Metric]:
        b = self.backing.stats
        for name, value, text in (
            ("written_back", b.written_back, "Records written to the backing file."),
            ("loaded", b.loaded, "Records read back from the backing file."),
            ("write_errors", b.write_errors, "Write-backs that failed (e.g. disk full)."),
            ("refused_full", b.refused_full, "Write-backs refused at the backing file limit."),
            ("corrupt_records", b.corrupt, "Records that failed verification when read."),
            ("torn_records", b.torn, "Records with a damaged header dropped on open."),
            ("damaged_records", b.damaged, "Records kept on open whose data is damaged."),
            ("recovered_records", b.recovered, "Records found when the file was opened."),
        ):
            yield CounterMetricFamily(f"ramster_backing_{name}", text, value)
        yield GaugeMetricFamily(
            "ramster_backing_size_bytes", "Size of the backing file.", self.backing.size_bytes
        )
