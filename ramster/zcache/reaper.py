# The reaper: frees whole pageframes, least recently used first, when the pool is full.
#
# Reclaim works on *units*, the smallest thing whose eviction frees frames: a zbud page (one frame,
# at most two zpages), a zspage (up to eight frames, all its zpages) or a raw frame.  Each
# allocator keeps its units on an LRU list stamped with zcache-wide ticks, and the reaper keeps
# those lists in two LruHeaps (ephemeral pools, persistent pools) that give the globally least
# recent unit in O(log n) however many pools exist: empty pools are never looked at.  It evicts
# every zpage of that unit and so frees all its frames: it never evicts a zpage that does not
# help free a frame.  Ephemeral zpages are dropped.  Persistent zpages are handed, still
# compressed, to the evictor, and only those it takes leave; if it refuses any, the unit stays
# (with what was refused) and no persistent unit is tried again in this pass, so a persistent
# page is never dropped.  Reclaim runs from the allocation that hit the limit and goes on down to
# the low mark (zswap's accept-threshold hysteresis), so a full pool is not reclaimed one frame
# per put.
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramster.zcache.codec import zpage_bytes, zpage_key
from ramster.zcache.errors import ZCacheError
from ramster.zcache.handles import EVICTED_TAG
from ramster.zcache.lru import LruHeap

if TYPE_CHECKING:
    from ramster.zcache.allocator import Allocator
    from ramster.zcache.cache import Pool, ZCache


class ReaperInvariantError(ZCacheError):
    """A zpage in a unit being reclaimed is not filed under its key (a bug, never user error)."""


@dataclass
class ReaperStats:
    reclaim_passes: int = 0
    frames_reclaimed: int = 0
    units_reclaimed: int = 0
    evicted_ephemeral: int = 0  # dropped
    evicted_persistent: int = 0  # taken by the evictor
    evict_refused: int = 0  # persistent zpages no evictor took (they stayed in RAM)
    reclaim_seconds: float = 0.0


Victim = tuple["Pool", "Allocator"]


class Reaper:
    def __init__(self, cache: ZCache) -> None:
        self.cache = cache
        self.stats = ReaperStats()
        self._ephemeral: LruHeap[Victim] = LruHeap()
        self._persistent: LruHeap[Victim] = LruHeap()

    def watch(self, pool: Pool) -> None:
        """Make the units of a new pool candidates for reclaim."""
        heap = self._ephemeral if pool.ephemeral else self._persistent
        heap.add(pool.id << 1, pool.zalloc.lru, (pool, pool.zalloc))
        heap.add(pool.id << 1 | 1, pool.raw.lru, (pool, pool.raw))

    def unwatch(self, pool: Pool) -> None:
        """Forget a pool that is being destroyed."""
        heap = self._ephemeral if pool.ephemeral else self._persistent
        heap.discard(pool.id << 1)
        heap.discard(pool.id << 1 | 1)

    @property
    def lists_inspected(self) -> int:
        """LRU lists looked at to find victims so far: the work of victim selection."""
        return self._ephemeral.inspected + self._persistent.inspected

    def reclaim(self, target_frames: int) -> int:
        """Free units, oldest first, until at most `target_frames` are in use; frames freed."""
        cache = self.cache
        arena = cache.arena
        start = time.perf_counter()
        before = arena.in_use
        persistent_ok = cache.evictor is not None
        while arena.in_use > target_frames:
            victim = self._oldest(persistent_ok)
            if victim is None:
                break
            pool, alloc, unit = victim
            if not self._evict_unit(pool, alloc, unit):
                persistent_ok = False  # the evictor is full: only ephemeral units from now on
        freed = before - arena.in_use
        stats = self.stats
        stats.reclaim_passes += 1
        stats.frames_reclaimed += freed
        stats.reclaim_seconds += time.perf_counter() - start
        return freed

    def _oldest(self, persistent_ok: bool) -> tuple[Pool, Allocator, int] | None:
        best = self._ephemeral.oldest()
        if persistent_ok:
            other = self._persistent.oldest()
            if other is not None and (best is None or other[0] < best[0]):
                best = other
        if best is None:
            return None
        _, (pool, alloc), unit = best
        return pool, alloc, unit

    def _evict_unit(self, pool: Pool, alloc: Allocator, unit: int) -> bool:
        """Evict every zpage of a unit; False if the evictor refused any (they stay)."""
        cache = self.cache
        tag = pool.tag_of(alloc)
        handles = alloc.unit_handles(unit)
        keys = []
        zpages = []
        for handle in handles:
            slot = alloc.read(handle)
            key = zpage_key(slot)
            if pool.index.get(*key) != tag | handle:
                raise ReaperInvariantError(f"zpage {handle:#x} in pool {pool.id} is not filed")
            keys.append(key)
            zpages.append(zpage_bytes(slot))
        stats = self.stats
        stats.units_reclaimed += 1
        if pool.ephemeral:
            for handle, key in zip(handles, keys, strict=True):
                pool.index.pop(*key)
                alloc.free(handle)
            stats.evicted_ephemeral += len(handles)
            return True
        assert cache.evictor is not None
        locations = cache.evictor.evict(pool.id, pool.zalloc.name, zpages)
        refused = 0
        for handle, key, location in zip(handles, keys, locations, strict=True):
            if location:
                pool.index.replace(*key, EVICTED_TAG | location)
                alloc.free(handle)
            else:
                refused += 1
        pool.evicted += len(handles) - refused
        stats.evicted_persistent += len(handles) - refused
        stats.evict_refused += refused
        return not refused
