# `ramster bench fragmentation`: what flush and overwrite churn leaves in a pool, and whether
# compaction, not eviction, cures it.
#
# The corpus pages are split in two sets by zpage size, alternate 16-byte size steps (A: even,
# B: odd), so both have about the same sizes but land in different size classes: the fill puts
# A pages, churn brings B pages (then A again, and so on), and the mix of classes shifts as it
# does when what a workload stores changes.
#
# Repacking: N pages fill one pool with room to spare; a random half is flushed and a quarter of
# the keys (of those left) is overwritten with pages of the other set, so holes open in
# zspages of every class.  Frames in use are counted before and after ZCache.compact()
# and set against the perfect-packing frames of what is left (its zpage bytes / 4096, rounded
# up): `repack_share` is the part of what perfect repacking would free that compaction freed
# (goal >= 0.9).  Sizes are the engine's own: the bench encodes with the pool's encoder().
#
# Churn: a pool whose limit the N pages fill to FILL_SHARE (below the reaper's low mark) goes
# through ROUNDS rounds of the same flush-half / overwrite-a-quarter, each followed by puts of
# fresh keys back up to N pages, so the live data stays what fitted at the start.  It runs twice
# on the same seeded trace, with the reaper compacting before it evicts and without
# (ZCacheConfig.compact_before_evict), and counts pages evicted; the goal is none with
# compaction on.  The pool is ephemeral, so an eviction is a drop and no evictor is needed: the
# reaper's choice (compact or evict) is the same for either kind.
#
# zbud has no compaction (neither has the kernel's): its lines show what buddy pairing alone
# keeps, against the same perfect packing.
from __future__ import annotations

import random
from typing import Any

from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig

BATCH = 256
FILL_SHARE = 0.8  # of the pool limit that N pages take after the first fill
ROUNDS = 4


class Workload:
    """A seeded trace over N keys of one pool: fill, then flush-half / overwrite-a-quarter /
    refill rounds.  It knows the zpage size of every corpus page, and what each key holds."""

    def __init__(self, pages: list[bytes], n: int, seed: int) -> None:
        self.pages, self.n = pages, n
        self.rng = random.Random(seed)
        probe = ZCache(ZCacheConfig(pool_limit_frames=1))
        encoded = probe.encoder(probe.create_pool(PoolKind.PERSISTENT)).encode(
            [(0, i) for i in range(len(pages))], pages
        )
        probe.close()
        # bytes each page takes in frames: 0 for same-filled (a word, no frame) and refused ones
        self.size = [len(z) if z is not None and len(z) > 8 else 0 for z in encoded]
        # the pages of each set: (size step) % 2
        self.sets = [[i for i, s in enumerate(self.size) if s and s // 16 % 2 == k] for k in (0, 1)]
        self.turn = 0  # the set that fresh pages come from
        self.held: dict[tuple[int, int], int] = {}  # key -> corpus page
        self.next_key = 0

    def put(self, cache: ZCache, pool: int, items: list[tuple[tuple[int, int], int]]) -> None:
        for start in range(0, len(items), BATCH):
            part = items[start : start + BATCH]
            results = cache.put_batch(pool, [k for k, _ in part], [self.pages[p] for _, p in part])
            for (key, page), result in zip(part, results, strict=True):
                if result.refused:
                    self.held.pop(key, None)
                else:
                    self.held[key] = page

    def fresh(self, count: int) -> list[tuple[tuple[int, int], int]]:
        first, self.next_key = self.next_key, self.next_key + count
        pages = self.sets[self.turn]
        return [((0, k), self.rng.choice(pages)) for k in range(first, first + count)]

    def fill(self, cache: ZCache, pool: int) -> None:
        self.put(cache, pool, self.fresh(self.n))

    def churn(self, cache: ZCache, pool: int) -> None:
        """Flush a random half, overwrite a quarter of the keys with pages of the other set."""
        self.turn ^= 1
        keys = sorted(self.held)
        for key in self.rng.sample(keys, len(keys) // 2):
            cache.flush_page(pool, *key)
            del self.held[key]
        left = sorted(self.held)
        overwrite = self.rng.sample(left, min(len(left), self.n // 4))
        pages = self.sets[self.turn]
        self.put(cache, pool, [(key, self.rng.choice(pages)) for key in overwrite])

    def refill(self, cache: ZCache, pool: int) -> None:
        self.put(cache, pool, self.fresh(self.n - len(self.held)))

    def live_bytes(self) -> int:
        return sum(self.size[p] for p in self.held.values())


def repacking(pages: list[bytes], allocator: str, n: int, seed: int) -> dict[str, Any]:
    work = Workload(pages, n, seed)
    cache = ZCache(ZCacheConfig(pool_limit_frames=2 * n + 64))
    pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
    work.fill(cache, pool)
    filled = cache.frames
    work.churn(cache, pool)
    before = cache.frames
    freed = cache.compact()
    after = cache.frames
    perfect = -(-work.live_bytes() // PAGE_SIZE)
    cache.verify()
    cache.close()
    return {
        "frames_filled": filled,
        "frames_before_compaction": before,
        "frames_after_compaction": after,
        "perfect_frames": perfect,
        "compaction_freed_frames": freed,
        "repack_share": round((before - after) / max(1, before - perfect), 3),
        "after_vs_perfect": round(after / max(1, perfect), 3),
    }


def churn_evictions(
    pages: list[bytes], allocator: str, n: int, seed: int, compact: bool
) -> dict[str, Any]:
    sizing = Workload(pages, n, seed)
    probe = ZCache(ZCacheConfig(pool_limit_frames=2 * n + 64))
    sizing.fill(probe, probe.create_pool(PoolKind.EPHEMERAL, allocator))
    limit = int(probe.frames / FILL_SHARE) + 1
    probe.close()
    work = Workload(pages, n, seed)
    cache = ZCache(ZCacheConfig(pool_limit_frames=limit, compact_before_evict=compact))
    pool = cache.create_pool(PoolKind.EPHEMERAL, allocator)
    work.fill(cache, pool)
    for _ in range(ROUNDS):
        work.churn(cache, pool)
        work.refill(cache, pool)
    s = cache.snapshot()
    cache.close()
    return {
        "limit_frames": limit,
        "evicted": s.evicted_ephemeral,
        "compacted_frames": s.compacted_frames,
        "live_perfect_frames": -(-work.live_bytes() // PAGE_SIZE),
    }


def run(pages: list[bytes], allocator: str, n: int, seed: int = 1) -> dict[str, Any]:
    on = churn_evictions(pages, allocator, n, seed, compact=True)
    off = churn_evictions(pages, allocator, n, seed, compact=False)
    return {
        "allocator": allocator,
        "pages": n,
        **repacking(pages, allocator, n, seed),
        "churn_rounds": ROUNDS,
        "churn_limit_frames": on["limit_frames"],
        "churn_evicted_compaction_on": on["evicted"],
        "churn_evicted_compaction_off": off["evicted"],
        "churn_compacted_frames": on["compacted_frames"],
    }
