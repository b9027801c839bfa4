# The reaper: frees whole pageframes, least recently used first, when the pool is full.
#
# Reclaim works on *units*, the smallest thing whose eviction frees frames: a zbud page (one frame,
# at most two zpages), a zspage (up to sixteen frames, all its zpages) or a raw frame.  Each
# allocator keeps its units on an LRU list stamped with zcache-wide ticks, and the reaper keeps
# those lists in two LruHeaps (ephemeral pools, persistent pools) that give the globally least
# recent unit in O(log n) however many pools exist: empty pools are never looked at.  It evicts
# every zpage of that unit and so frees all its frames: it never evicts a zpage that does not
# help free a frame.  Ephemeral zpages are dropped.  Persistent zpages are handed, still
# compressed, to the evictor, and only those it takes leave; if it refuses any, the unit stays
# (with what was refused) and no persistent unit is tried again in this pass, so a persistent
# page is never dropped.  Reclaim runs from the allocation that hit the limit and goes on down to
# the low mark (zswap's accept-threshold hysteresis), so a full pool is not reclaimed one frame
# per put; or, with the zcache's reclaim_step set, that many frames at most, and its owner goes
# on in steps between other work (node/reclaimer.py: a tenth of a big pool in one go stalls the
# node for seconds).  Before it evicts anything it compacts the pools whose allocator can give
# frames back by moving zpages (zsmalloc's `compactable`, which each allocator announces when it
# leaves zero, so finding them costs nothing per pool either): flush and overwrite churn leaves
# holes that compaction closes without sending a single zpage out.
#
# At a graceful stop, write_back_all() offers the evictor every persistent page still in RAM
# (same-filled pages too, made into zpages), through the same hand-over as reclaim, so a node's
# disk and peers then hold all of its persistent pages; what is refused stays in RAM.
#
# A hand-over checks its zpages against the index in one call (get_many), files the locations
# the evictor gave in one (set_many) and frees what was taken in the engine's batch frees
# (ZCache.release_all).  It did so a zpage at a time: `ramster bench reaper` (python-app corpus,
# 16,384 frames, 196,608 keys, 600,000 ops) wrote back 92-114 thousand pages per CPU-second at
# the stop, now 134-136 thousand, and reclaim took 0.95-0.98 s, now 0.86-0.91 (alternating runs).
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from ramster.zcache.codec import compress, make_zpage, zpage_bytes, zpage_key
from ramster.zcache.errors import InvariantViolation
from ramster.zcache.handles import EVICTED_TAG, HANDLE_MASK, KIND_SHIFT, SAME, ZPAGE_TAG
from ramster.zcache.lru import LruHeap

if TYPE_CHECKING:
    from ramster.zcache.allocator import Allocator
    from ramster.zcache.cache import ZCache
    from ramster.zcache.pool import Pool


@dataclass
class ReaperStats:
    reclaim_passes: int = 0
    frames_reclaimed: int = 0  # by eviction (compaction counts in the zcache's compacted_frames)
    units_reclaimed: int = 0
    evicted_ephemeral: int = 0  # dropped
    evicted_persistent: int = 0  # taken by the evictor
    evict_refused: int = 0  # persistent zpages no evictor took (they stayed in RAM)
    reclaim_seconds: float = 0.0


Victim = tuple["Pool", "Allocator"]
Key = tuple[int, int]
WRITE_BACK_BATCH = 256  # zpages per evictor call in write_back_all


class Reaper:
    def __init__(self, cache: ZCache) -> None:
        self.cache = cache
        self.stats = ReaperStats()
        self._ephemeral: LruHeap[Victim] = LruHeap()
        self._persistent: LruHeap[Victim] = LruHeap()
        self._compactable: dict[int, Pool] = {}  # holds every pool whose zalloc is compactable

    def watch(self, pool: Pool) -> None:
        """Make the units of a new pool candidates for reclaim and compaction."""
        heap = self._ephemeral if pool.ephemeral else self._persistent
        heap.add(pool.id << 1, pool.zalloc.lru, (pool, pool.zalloc))
        heap.add(pool.id << 1 | 1, pool.raw.lru, (pool, pool.raw))
        pool.zalloc.on_compactable = partial(self._compactable.__setitem__, pool.id, pool)

    def unwatch(self, pool: Pool) -> None:
        """Forget a pool that is being destroyed."""
        heap = self._ephemeral if pool.ephemeral else self._persistent
        heap.discard(pool.id << 1)
        heap.discard(pool.id << 1 | 1)
        pool.zalloc.on_compactable = None
        self._compactable.pop(pool.id, None)

    def compact(self, target_frames: int = -1) -> int:
        """Compact the pools that can give frames back, while more than `target_frames` are in
        use; the frames freed."""
        arena = self.cache.arena
        before = arena.in_use

        def enough() -> bool:
            return arena.in_use <= target_frames

        while self._compactable and not enough():
            _, pool = self._compactable.popitem()
            if pool.zalloc.compactable:
                pool.zalloc.compact(partial(self._moved, pool), enough)
                if pool.zalloc.compactable:  # stopped early: the rest in a later step
                    self._compactable[pool.id] = pool
        freed = before - arena.in_use
        self.cache.stats.compacted_frames += freed
        return freed

    @staticmethod
    def _moved(pool: Pool, old: int, new: int, zpage: bytes | memoryview) -> None:
        oid, index = zpage_key(zpage)
        if pool.index.get(oid, index) != ZPAGE_TAG | old:
            raise InvariantViolation(f"moved zpage {old:#x} is not filed under its key")
        pool.index.replace(oid, index, ZPAGE_TAG | new)

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
        compacted = self.compact(target_frames) if cache.config.compact_before_evict else 0
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
        stats.frames_reclaimed += freed - compacted
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
        handles = alloc.unit_handles(unit)
        keys, slots = self._filed(pool, alloc, handles)
        stats = self.stats
        stats.units_reclaimed += 1
        if pool.ephemeral:
            pool.index.pop_many(keys)
            self._free(pool, alloc, handles)
            stats.evicted_ephemeral += len(handles)
            return True
        return self._evict(pool, alloc, handles, keys, slots)

    def write_back_all(self) -> tuple[int, int]:
        """Offer every persistent page in RAM to the evictor; (pages taken, pages refused)."""
        cache = self.cache
        if cache.evictor is None:
            left = sum(p.index.count - p.evicted for p in cache.pools.values() if not p.ephemeral)
            return 0, left
        before = self.stats.evicted_persistent, self.stats.evict_refused
        same = cache.same
        for pool in list(cache.pools.values()):
            if pool.ephemeral:
                continue
            alloc: Allocator
            for alloc in (pool.zalloc, pool.raw):
                handles = [h for unit in list(alloc.lru) for h in alloc.unit_handles(unit)]
                for start in range(0, len(handles), WRITE_BACK_BATCH):
                    chunk = handles[start : start + WRITE_BACK_BATCH]
                    keys, slots = self._filed(pool, alloc, chunk)
                    self._evict(pool, alloc, chunk, keys, slots)
            words = [
                (o, i, h & HANDLE_MASK) for o, i, h in pool.index.items() if h >> KIND_SHIFT == SAME
            ]
            for start in range(0, len(words), WRITE_BACK_BATCH):
                chunk_words = words[start : start + WRITE_BACK_BATCH]
                keys = [(oid, index) for oid, index, _ in chunk_words]
                zpages = [make_zpage(o, i, compress(same.page(slot))) for o, i, slot in chunk_words]
                for (*_, slot), location in zip(
                    chunk_words, self._hand_over(pool, keys, zpages), strict=True
                ):
                    if location:
                        same.unref(slot)
        stats = self.stats
        return stats.evicted_persistent - before[0], stats.evict_refused - before[1]

    def _filed(
        self, pool: Pool, alloc: Allocator, handles: list[int]
    ) -> tuple[list[Key], list[bytes]]:
        """The keys and slots of zpages in an allocator, each checked (in one index call) to be
        filed under its key."""
        tag = pool.tag_of(alloc)
        slots = [alloc.read(handle) for handle in handles]
        keys = [zpage_key(slot) for slot in slots]
        filed = pool.index.get_many(keys)
        for handle, found in zip(handles, filed, strict=True):
            if found != tag | handle:
                raise InvariantViolation(f"zpage {handle:#x} in pool {pool.id} is not filed")
        return keys, slots

    def _evict(
        self, pool: Pool, alloc: Allocator, handles: list[int], keys: list[Key], slots: list[bytes]
    ) -> bool:
        """Hand a persistent pool's zpages (in `slots` of `alloc`, under `handles` and `keys`)
        over to the evictor and free those it takes; whether it took all (the rest stay)."""
        locations = self._hand_over(pool, keys, [zpage_bytes(slot) for slot in slots])
        taken = [h for h, at in zip(handles, locations, strict=True) if at]
        self._free(pool, alloc, taken)
        return len(taken) == len(handles)

    def _hand_over(self, pool: Pool, keys: list[Key], zpages: list[bytes]) -> list[int]:
        """Offer a persistent pool's zpages to the evictor and file each one it takes as
        evicted (one index call); per zpage its location, 0 where refused.  The caller frees
        what was taken."""
        evictor = self.cache.evictor
        assert evictor is not None
        locations = evictor.evict(pool.id, pool.zalloc.name, zpages)
        taken = [at for at in locations if at]
        if len(taken) < len(keys):
            keys = [key for key, at in zip(keys, locations, strict=True) if at]
        pool.index.set_many(keys, [EVICTED_TAG | at for at in taken])
        pool.evicted += len(taken)
        self.stats.evicted_persistent += len(taken)
        self.stats.evict_refused += len(zpages) - len(taken)
        return locations

    def _free(self, pool: Pool, alloc: Allocator, handles: list[int]) -> None:
        """Free zpages of `alloc` whose keys no longer name them, in the engine's batch frees."""
        tag = pool.tag_of(alloc)
        self.cache.release_all(pool, [tag | handle for handle in handles])
