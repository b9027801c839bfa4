# `ramster bench reaper`: the reaper under a workload larger than the pool limit.
#
# A seeded trace over K keys with Zipf-distributed popularity (first touch of a key is a put; then
# mostly gets, some overwrites) runs against one persistent pool whose limit forces reclaim, with a
# backing file behind it.  Every get is verified.  The same trace is replayed against an exact LRU
# cache whose capacity in pages is what the zcache holds at its limit (limit frames x measured
# pages per frame, plus same-filled pages, which take no frame); a get is a hit when the page is
# in RAM.  Reclaim efficiency is frames freed per zpage evicted, against the ideal 1/pages-per-frame
# of an allocator that never evicts a zpage that does not help free a frame.
#
# Then it writes back what RAM holds, as a graceful stop does (write_back_all, timed in CPU
# seconds), and reads every page back from the disk.
#
# With --empty-pools N it also times a reclaim-bound put stream (a full persistent pool with a
# backing file, every batch forcing reclaim) in the same run, alone and beside N empty pools of
# both kinds, best of five each, interleaved: victim selection must not depend on the number of
# pools, so the ratio should be near 1.  It counts the process's CPU time, not wall time, so
# other load on a small shared machine does not swamp a ratio meant to be near 1.
from __future__ import annotations

import bisect
import random
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ramster.bench.report import Progress
from ramster.zcache import PoolKind, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile

BATCH = 256  # pages per put_batch in the reclaim-bound stream


def zipf_trace(keys: int, ops: int, skew: float, seed: int) -> list[int]:
    """`ops` keys drawn with Zipf(skew) popularity; the hot ranks are scattered over key space."""
    rng = random.Random(seed)
    cdf = []
    total = 0.0
    for rank in range(1, keys + 1):
        total += rank**-skew
        cdf.append(total)
    where = list(range(keys))
    rng.shuffle(where)
    return [where[bisect.bisect_left(cdf, rng.random() * total)] for _ in range(ops)]


def lru_hit_ratio(trace: list[tuple[bool, int]], capacity: int) -> float:
    """Hit ratio of gets on an exact LRU cache of `capacity` pages (a miss brings the page in)."""
    cache: OrderedDict[int, None] = OrderedDict()
    gets = hits = 0
    for is_get, key in trace:
        if is_get:
            gets += 1
            if key in cache:
                hits += 1
        cache[key] = None
        cache.move_to_end(key)
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits / gets if gets else 0.0


def run(
    pages: list[bytes],
    allocator: str,
    pool_limit_frames: int,
    keys: int,
    ops: int,
    skew: float = 0.9,
    write_share: float = 0.1,
    seed: int = 1,
) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    count = len(pages)
    version: dict[int, int] = {}
    trace: list[tuple[bool, int]] = []
    for key in zipf_trace(keys, ops, skew, seed):
        is_get = key in version and rng.random() >= write_share
        if not is_get:
            version[key] = version.get(key, -1) + 1
        trace.append((is_get, key))
    version.clear()
    verified = True
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        backing = BackingFile(Path(tmp) / "backing.dat")
        cache = ZCache(ZCacheConfig(pool_limit_frames=pool_limit_frames), evictor=backing)
        pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
        progress = Progress("ops", ops)
        stored: dict[int, bytes] = {}
        for n, (is_get, key) in enumerate(trace, 1):
            if is_get:
                expected = stored.get(key)
                if cache.get(pool, 0, key) != expected:
                    verified = False
            else:
                version[key] = version.get(key, -1) + 1
                page = pages[(key * 7 + version[key]) % count]
                if cache.put(pool, 0, key, page).refused:
                    stored.pop(key, None)
                else:
                    stored[key] = page
            if n % 4096 == 0:
                progress.update(n)
        progress.update(ops)
        s = cache.snapshot()
        ppf = s.pages_per_frame
        evicted = s.evicted_persistent + s.evicted_ephemeral
        gets = sum(1 for is_get, _ in trace if is_get)
        # a graceful stop's write-back of what RAM holds, then every page read back from disk
        during = backing.stats.written_back
        start = time.process_time()
        taken, left = cache.write_back_all()
        write_back_cpu_s = time.process_time() - start
        verified = verified and not left
        for key, page in stored.items():
            verified = verified and cache.get(pool, 0, key) == page
        capacity = int(pool_limit_frames * ppf) + s.same_filled_pages
        result: dict[str, Any] = {
            "allocator": allocator,
            "pool_limit_frames": pool_limit_frames,
            "keys": keys,
            "ops": ops,
            "gets": gets,
            "frames_freed_per_evicted_zpage": round(s.reclaimed_frames / max(1, evicted), 4),
            "ideal_frames_per_zpage": round(1 / ppf, 4) if ppf else 0.0,
            "pages_per_frame": round(ppf, 4),
            "hit_ratio": round(1 - s.evictor_hits / max(1, gets), 4),
            "lru_hit_ratio": round(lru_hit_ratio(trace, capacity), 4),
            "lru_capacity_pages": capacity,
            "written_back": during,
            "promoted": s.promoted,
            "reclaim_passes": s.reclaim_passes,
            "compacted_frames": s.compacted_frames,
            "reclaim_seconds": round(s.reclaim_seconds, 3),
            "stop_written_back": taken,
            "stop_write_back_pages_per_cpu_s": round(taken / max(write_back_cpu_s, 1e-9)),
            "refused": s.refused(),
            "verified": verified,
        }
        cache.close()
        backing.close()
    return result


def reclaim_put_rate(
    pages: list[bytes], allocator: str, pool_limit_frames: int, empty_pools: int
) -> float:
    """Pages per CPU-second of put batches into a full persistent pool (every batch reclaims),
    with `empty_pools` empty pools beside it."""
    count = len(pages)
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        backing = BackingFile(Path(tmp) / "backing.dat")
        cache = ZCache(ZCacheConfig(pool_limit_frames=pool_limit_frames), evictor=backing)
        for i in range(empty_pools):
            cache.create_pool(PoolKind.EPHEMERAL if i % 2 else PoolKind.PERSISTENT, allocator)
        pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
        n = 0
        while not cache.snapshot().reclaim_passes:  # fill up to the limit, untimed
            cache.put_batch(pool, [(0, n + i) for i in range(BATCH)], pages[:BATCH])
            n += BATCH
        total = 8 * pool_limit_frames  # about three times the limit, in pages
        start = time.process_time()
        for first in range(n, n + total, BATCH):
            keys = [(0, i) for i in range(first, first + BATCH)]
            cache.put_batch(pool, keys, [pages[i % count] for _, i in keys])
        elapsed = time.process_time() - start
        cache.close()
        backing.close()
    return total / elapsed


def empty_pools_report(
    pages: list[bytes], allocator: str, pool_limit_frames: int, empty_pools: int
) -> dict[str, Any]:
    alone = crowded = 0.0
    for _ in range(5):
        alone = max(alone, reclaim_put_rate(pages, allocator, pool_limit_frames, 0))
        crowded = max(crowded, reclaim_put_rate(pages, allocator, pool_limit_frames, empty_pools))
    return {
        "reclaim_put_pages_per_cpu_s_1_pool": round(alone),
        f"reclaim_put_pages_per_cpu_s_{empty_pools}_empty_pools": round(crowded),
        "empty_pools_put_ratio": round(crowded / alone, 3),
    }
