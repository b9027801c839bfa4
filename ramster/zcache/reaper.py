# The reaper: frees whole pageframes, least recently used first, when the pool is full.
#
# Reclaim works on *units*, the smallest thing whose eviction frees frames: a zbud page (one frame,
# at most two zpages), a zspage (up to eight frames, all its zpages) or a raw frame.  Each
# allocator keeps its units on an LRU list stamped with zcache-wide ticks, so the reaper compares
# the oldest unit of every allocator of every pool and takes the globally least recent one, evicts
# every zpage in it and so frees all its frames: it never evicts a zpage that does not help free
# a frame.  Ephemeral zpages are dropped.  Persistent zpages are handed, still compressed, to the
# evictor, and only those it takes leave; if it refuses any, the unit stays (with what was
# refused) and no persistent unit is tried again in this pass, so a persistent page is never
# dropped.  Reclaim runs from the allocation that hit the limit and goes on down to the low mark
# (zswap's accept-threshold hysteresis), so a full pool is not reclaimed one frame per put.
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramster.zcache.codec import zpage_bytes, zpage_key
from ramster.zcache.errors import ZCacheError
from ramster.zcache.handles import EVICTED_TAG

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


class Reaper:
    def __init__(self, cache: ZCache) -> None:
        self.cache = cache
        self.stats = ReaperStats()

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
        best: tuple[Pool, Allocator, int] | None = None
        best_tick = 0
        for pool in self.cache.pools.values():
            if not (pool.ephemeral or persistent_ok):
                continue
            alloc: Allocator
            for alloc in (pool.zalloc, pool.raw):
                unit = alloc.lru.oldest()
                if unit and (best is None or alloc.lru.tick[unit] < best_tick):
                    best, best_tick = (pool, alloc, unit), alloc.lru.tick[unit]
        return best

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
