# One consistent read of the engine's counters and gauges, for the Stats RPC and for metrics.
#
# Metrics are scraped on the HTTP server's thread while the event loop mutates the engine, so
# this only reads: plain int attributes (atomic under the GIL) and a list() copy of the pool
# table taken in one C-level step, never a Python-level walk of a dict that may change size.
# The numbers of one snapshot may be a few operations apart; each one is exact.
from __future__ import annotations

from dataclasses import dataclass

from ramster.zcache import PAGE_SIZE, PoolKind, PutResult, ZCache


@dataclass(frozen=True)
class PoolRow:
    pool: int
    kind: PoolKind
    allocator: str
    pages: int


@dataclass(frozen=True)
class EngineSnapshot:
    pool_limit_bytes: int
    pool_size_bytes: int
    stored_pages: int
    zpages: int
    puts: int
    gets: int
    hits: int
    misses: int
    corrupt: int
    unavailable: int
    evictor_hits: int  # gets served from the evictor (backing file, peers)
    duplicate_puts: int
    flushes: int
    compacted_frames: int
    written_back_pages: int  # persistent pages held by the evictor now
    reclaim_passes: int
    reclaimed_frames: int
    evicted_ephemeral: int  # dropped by the reaper
    evicted_persistent: int  # handed to the evictor
    evict_refused: int  # the evictor refused them; they stayed in RAM
    outcomes: dict[str, int]  # every PutResult reason, refused or not
    pools: list[PoolRow]

    @property
    def pages_per_frame(self) -> float:
        frames = self.pool_size_bytes // PAGE_SIZE
        return self.zpages / frames if frames else 0.0


def take_snapshot(engine: ZCache) -> EngineSnapshot:
    pools = list(engine.pools.items())
    stats = engine.stats
    reaper = engine.reaper.stats
    outcomes = dict(stats.outcomes)
    return EngineSnapshot(
        pool_limit_bytes=engine.arena.capacity * PAGE_SIZE,
        pool_size_bytes=engine.frames * PAGE_SIZE,
        stored_pages=sum(p.index.count for _, p in pools),
        zpages=sum(p.zalloc.zpages + p.raw.zpages for _, p in pools),
        puts=stats.puts,
        gets=stats.gets,
        hits=stats.hits,
        misses=stats.misses,
        corrupt=stats.corrupt,
        unavailable=stats.unavailable,
        evictor_hits=stats.evicted_hits,
        duplicate_puts=stats.duplicate_puts,
        flushes=stats.flushes,
        compacted_frames=stats.compacted_frames,
        written_back_pages=sum(p.evicted for _, p in pools),
        reclaim_passes=reaper.reclaim_passes,
        reclaimed_frames=reaper.frames_reclaimed,
        evicted_ephemeral=reaper.evicted_ephemeral,
        evicted_persistent=reaper.evicted_persistent,
        evict_refused=reaper.evict_refused,
        outcomes={r.reason: outcomes.get(r, 0) for r in PutResult},
        pools=[PoolRow(i, p.kind, p.zalloc.name, p.index.count) for i, p in pools],
    )
