# The engine's read-only face: one frozen, consistent copy of what outsiders may know.
#
# The node (Stats RPC, metrics), the ramster layer and the benchmarks read the engine through
# ZCache.snapshot() and a few narrow methods (pool_ids, pool_pages, keys...), never through its
# pools, indexes, allocators or reaper, so those can change shape without breaking anyone.  A
# snapshot is made on the engine's thread, in one call that runs no other engine code, so its
# numbers agree with each other (puts = sum of outcomes; stored pages = sum over pools); and it
# is made of frozen dataclasses and tuples, so it can be handed to another thread (a metrics
# scrape) and read there at leisure.  Its cost is O(pools), a few microseconds per pool: cheap
# enough per scrape or Stats call, not meant for a per-page path.
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramster.zcache.codec import PAGE_SIZE
from ramster.zcache.config import PoolKind, PutResult

if TYPE_CHECKING:
    from ramster.zcache.cache import ZCache


@dataclass(frozen=True, slots=True)
class PoolView:
    id: int
    kind: PoolKind
    allocator: str
    store_raw: bool
    pages: int  # keys that hold a page, wherever it is (frames, same-filled, evicted)
    zpages: int  # pages in frames (compressed or raw)
    evicted: int  # pages held by the evictor (backing file, peers)
    frames: int  # frames the pool's allocators own


@dataclass(frozen=True, slots=True)
class Snapshot:
    pool_limit_frames: int  # the pool limit
    frames: int  # frames in use
    same_filled_pages: int  # pages stored as one repeated word (no frame)
    puts: int
    gets: int
    hits: int
    misses: int
    corrupt: int
    unavailable: int  # gets of pages whose every copy was out of reach
    evictor_hits: int  # gets served from the evictor (a miss in RAM)
    promoted: int  # evicted pages a get brought back to RAM
    duplicate_puts: int
    flushes: int
    compacted_frames: int  # frames freed by moving zpages
    outcomes: tuple[int, ...]  # pages put, one count per PutResult in its order
    reclaim_passes: int
    reclaimed_frames: int  # by eviction
    reclaimed_units: int
    evicted_ephemeral: int  # dropped by the reaper
    evicted_persistent: int  # handed to the evictor
    evict_refused: int  # the evictor refused them; they stayed in RAM
    reclaim_seconds: float
    pools: tuple[PoolView, ...]

    @property
    def stored_pages(self) -> int:
        return sum(p.pages for p in self.pools)

    @property
    def zpages(self) -> int:
        return sum(p.zpages for p in self.pools)

    @property
    def evicted_pages(self) -> int:
        return sum(p.evicted for p in self.pools)

    @property
    def pages_per_frame(self) -> float:
        return self.zpages / self.frames if self.frames else 0.0

    @property
    def size_bytes(self) -> int:
        return self.frames * PAGE_SIZE

    @property
    def limit_bytes(self) -> int:
        return self.pool_limit_frames * PAGE_SIZE

    def outcome_counts(self) -> dict[str, int]:
        """Pages put by outcome reason ('stored', ..., 'poor_compression', 'no_room')."""
        return {r.reason: n for r, n in zip(PutResult, self.outcomes, strict=True)}

    def refused(self) -> dict[str, int]:
        """Refused puts by reason."""
        return {r.reason: n for r, n in zip(PutResult, self.outcomes, strict=True) if r.refused}


def take(cache: ZCache) -> Snapshot:
    """A snapshot of `cache`; call it on the engine's thread."""
    s, r = cache.stats, cache.reaper.stats
    return Snapshot(
        pool_limit_frames=cache.arena.capacity,
        frames=cache.arena.in_use,
        same_filled_pages=cache.same.pages,
        puts=s.puts,
        gets=s.gets,
        hits=s.hits,
        misses=s.misses,
        corrupt=s.corrupt,
        unavailable=s.unavailable,
        evictor_hits=s.evicted_hits,
        promoted=s.promoted,
        duplicate_puts=s.duplicate_puts,
        flushes=s.flushes,
        compacted_frames=s.compacted_frames,
        outcomes=tuple(s.outcomes[o] for o in PutResult),
        reclaim_passes=r.reclaim_passes,
        reclaimed_frames=r.frames_reclaimed,
        reclaimed_units=r.units_reclaimed,
        evicted_ephemeral=r.evicted_ephemeral,
        evicted_persistent=r.evicted_persistent,
        evict_refused=r.evict_refused,
        reclaim_seconds=r.reclaim_seconds,
        pools=tuple(
            PoolView(
                p.id, p.kind, p.allocator, p.store_raw, p.index.count, p.zpages, p.evicted, p.frames
            )
            for p in cache.pools.values()
        ),
    )
