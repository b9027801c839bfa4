# The reaper: LRU whole-unit reclaim at the pool limit, the evictor contract, and RSS.
from __future__ import annotations

from pathlib import Path

import pytest

from ramster.bench import reaper as reaper_bench
from ramster.bench.report import rss_bytes
from ramster.zcache import PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile
from ramster.zcache.evictor import EvictorChain
from ramster.zcache.handles import EVICTED, KIND_SHIFT

P, E = PoolKind.PERSISTENT, PoolKind.EPHEMERAL


def evicted_keys(cache: ZCache, pool: int) -> set[tuple[int, int]]:
    return {(o, i) for o, i, h in cache.pool(pool).index.items() if h >> KIND_SHIFT >= EVICTED}


@pytest.fixture(params=["zbud", "zsmalloc"])
def allocator(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_limit_triggers_reclaim_to_low_mark(
    tmp_path: Path, allocator: str, compressible_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=100, reclaim_to=0.5), evictor=backing)
    pool = cache.create_pool(P, allocator)
    keys = [(0, i) for i in range(1000)]
    pages = [compressible_pages[i % 88] for i in range(1000)]
    results = cache.put_batch(pool, keys, pages)
    assert PutResult.REFUSED_NO_ROOM not in results
    stats = cache.reaper.stats
    assert stats.reclaim_passes >= 1 and stats.frames_reclaimed > 0
    assert stats.evicted_persistent == backing.stats.written_back == cache.evicted_pages
    assert cache.frames <= 100
    cache.verify()
    assert cache.get_batch(pool, keys, exclusive=True) == pages
    cache.verify()
    assert backing.live == 0


def test_reclaim_takes_least_recently_used_first(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=30, reclaim_to=0.75), evictor=backing)
    pool = cache.create_pool(P, "zbud")
    old = [(0, i) for i in range(40)]
    cache.put_batch(pool, old, compressible_pages[:40])
    hot = old[:10]
    cache.get_batch(pool, hot)  # refreshes their frames
    cache.put_batch(pool, [(1, i) for i in range(30)], compressible_pages[40:70])
    gone = evicted_keys(cache, pool)
    assert gone, "the limit must have forced reclaim"
    assert not gone & set(hot), "recently used pages were reclaimed before cold ones"
    assert gone <= set(old), "pages just stored were reclaimed before old ones"


def test_ephemeral_pages_are_dropped_not_written(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=20))
    pool = cache.create_pool(E, "zsmalloc")
    keys = [(0, i) for i in range(300)]
    results = cache.put_batch(pool, keys, [compressible_pages[i % 88] for i in range(300)])
    assert PutResult.REFUSED_NO_ROOM not in results
    assert cache.reaper.stats.evicted_ephemeral > 0
    got = cache.get_batch(pool, keys)
    assert all(g is None or g == compressible_pages[i % 88] for i, g in enumerate(got))
    assert any(g is None for g in got)
    cache.verify()


def test_persistent_pages_stay_when_no_evictor(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=10))
    pool = cache.create_pool(P, "zbud")
    keys = [(0, i) for i in range(60)]
    results = cache.put_batch(pool, keys, compressible_pages[:60])
    assert PutResult.REFUSED_NO_ROOM in results
    for (_, i), result, got in zip(keys, results, cache.get_batch(pool, keys), strict=True):
        assert got == (None if result.refused else compressible_pages[i])
    cache.verify()


def test_ephemeral_pool_makes_room_for_persistent(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=10))
    eph = cache.create_pool(E)
    per = cache.create_pool(P)
    cache.put_batch(eph, [(0, i) for i in range(20)], compressible_pages[:20])
    assert cache.put(per, 0, 0, compressible_pages[30]) is PutResult.STORED
    assert cache.reaper.stats.evicted_ephemeral > 0


class Refusing:
    """An evictor that takes nothing."""

    def __init__(self) -> None:
        self.offered = 0

    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        self.offered += len(zpages)
        return [0] * len(zpages)

    def load(self, pool_id: int, location: int) -> bytes:
        raise AssertionError("nothing was taken")

    def forget(self, pool_id: int, locations: list[int]) -> None:
        raise AssertionError("nothing was taken")

    def recovered(self):  # type: ignore[no-untyped-def]
        return iter(())


def test_refusing_evictor_never_loses_a_page(
    allocator: str, compressible_pages: list[bytes]
) -> None:
    refusing = Refusing()
    cache = ZCache(ZCacheConfig(pool_limit_frames=12), evictor=refusing)
    pool = cache.create_pool(P, allocator)
    keys = [(0, i) for i in range(80)]
    results = cache.put_batch(pool, keys, compressible_pages[:80])
    assert refusing.offered > 0
    assert PutResult.REFUSED_NO_ROOM in results
    assert cache.reaper.stats.evict_refused > 0
    for (_, i), result, got in zip(keys, results, cache.get_batch(pool, keys), strict=True):
        assert got == (None if result.refused else compressible_pages[i])
    cache.verify()


def test_chain_falls_through_to_backing_file(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    refusing = Refusing()
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=12), evictor=EvictorChain([refusing, backing]))
    pool = cache.create_pool(P)
    keys = [(0, i) for i in range(80)]
    assert not any(r.refused for r in cache.put_batch(pool, keys, compressible_pages[:80]))
    assert refusing.offered == backing.stats.written_back > 0
    assert cache.get_batch(pool, keys) == compressible_pages[:80]
    cache.verify()


def test_full_backing_file_refuses_and_keeps_pages(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat", limit_bytes=64 * 1024)
    cache = ZCache(ZCacheConfig(pool_limit_frames=12), evictor=backing)
    pool = cache.create_pool(P)
    keys = [(0, i) for i in range(88)]
    results = cache.put_batch(pool, keys, compressible_pages)
    assert backing.stats.refused_full > 0
    assert PutResult.REFUSED_NO_ROOM in results
    for (_, i), result, got in zip(keys, results, cache.get_batch(pool, keys), strict=True):
        assert got == (None if result.refused else compressible_pages[i])
    cache.verify()


def test_a_second_get_promotes_an_evicted_page(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """A page read once since it was evicted stays where it is (a scan moves nothing); read
    again, it comes home and its evicted copy is forgotten.  Evicted again, it starts over."""
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=30), evictor=backing)
    pool = cache.create_pool(P)
    keys = [(0, i) for i in range(88)]
    cache.put_batch(pool, keys, compressible_pages)
    cache.flush_page(pool, *sorted(set(keys) - evicted_keys(cache, pool))[0])  # room for one
    key = sorted(evicted_keys(cache, pool))[0]
    assert cache.get(pool, *key) == compressible_pages[key[1]]
    assert key in evicted_keys(cache, pool) and cache.stats.promoted == 0
    forgotten = backing.stats.forgotten
    cache.verify()
    assert cache.get(pool, *key) == compressible_pages[key[1]]
    assert key not in evicted_keys(cache, pool)
    assert cache.stats.promoted == 1 and backing.stats.forgotten == forgotten + 1
    cache.verify()
    cache.write_back_all()
    assert cache.get(pool, *key) == compressible_pages[key[1]]
    assert key in evicted_keys(cache, pool) and cache.stats.promoted == 1
    cache.verify()


def test_promotions_never_evict_another_page(
    tmp_path: Path, compressible_pages: list[bytes], allocator: str
) -> None:
    """A get brings an evicted page home only into free room: with the pool full, a batch get
    of evicted pages evicts nothing (each would push another page out); once flushes made room,
    the same gets promote."""
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=30), evictor=backing)
    pool = cache.create_pool(P, allocator)
    keys = [(0, i) for i in range(88)]
    cache.put_batch(pool, keys, compressible_pages)
    evicted = sorted(evicted_keys(cache, pool))
    in_ram = sorted(set(keys) - set(evicted))
    before = cache.reaper.stats.evicted_persistent
    order = evicted + in_ram
    assert cache.get_batch(pool, order) == [compressible_pages[i] for _, i in order]
    assert cache.reaper.stats.evicted_persistent == before
    for oid, index in in_ram:  # room: the evicted pages can come home now
        cache.flush_page(pool, oid, index)
    assert cache.get_batch(pool, evicted) == [compressible_pages[i] for _, i in evicted]
    assert cache.stats.promoted > 0 and cache.reaper.stats.evicted_persistent == before
    assert len(evicted_keys(cache, pool)) < len(evicted)
    cache.verify()


def test_rss_goes_down_when_reclaim_frees_frames(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=20_000, reclaim_to=0.1))
    eph = cache.create_pool(E)
    base = rss_bytes()
    n = 50_000  # about 17,000 frames
    for start in range(0, n, 1000):
        keys = [(0, i) for i in range(start, start + 1000)]
        cache.put_batch(eph, keys, [compressible_pages[i % 88] for _, i in keys])
    peak = rss_bytes() - base
    assert peak > 50 << 20
    per = cache.create_pool(P)
    big = [(0, i) for i in range(20_000)]  # over the limit: reclaim to 10% of it
    cache.put_batch(per, big[:12_000], [compressible_pages[i % 88] for _, i in big[:12_000]])
    assert cache.reaper.stats.frames_reclaimed > 10_000
    assert rss_bytes() - base < 0.7 * peak
    cache.close()


@pytest.mark.slow
def test_reaper_bench_meets_targets(allocator: str, compressible_pages: list[bytes]) -> None:
    result = reaper_bench.run(compressible_pages, allocator, 300, 3600, 20_000)
    assert result["verified"]
    assert result["frames_freed_per_evicted_zpage"] >= 0.9 * result["ideal_frames_per_zpage"]
    assert result["hit_ratio"] >= 0.9 * result["lru_hit_ratio"]
    assert result["written_back"] > 0
    assert result["stop_written_back"] > 0  # and every page read back after it (verified)


def test_reclaim_takes_least_recently_used_across_pools(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=30, reclaim_to=0.75), evictor=backing)
    cold, warm, eph, new = (cache.create_pool(k, "zbud") for k in (P, P, E, P))
    cache.put_batch(cold, [(0, i) for i in range(12)], compressible_pages[:12])
    cache.put_batch(eph, [(0, i) for i in range(12)], compressible_pages[12:24])
    cache.put_batch(warm, [(0, i) for i in range(12)], compressible_pages[24:36])
    cache.get_batch(cold, [(0, i) for i in range(12)])  # cold is now the most recent
    cache.put_batch(new, [(0, i) for i in range(30)], compressible_pages[40:70])
    assert cache.reaper.stats.evicted_ephemeral == 12, "the oldest pool goes first"
    assert evicted_keys(cache, warm) and not evicted_keys(cache, cold)
    assert not evicted_keys(cache, new)
    cache.verify()


def reclaim_work(empty_pools: int, tmp_path: Path, pages: list[bytes]) -> tuple[int, int]:
    """(LRU lists inspected, units reclaimed) for one reclaim-bound workload."""
    backing = BackingFile(tmp_path / f"b{empty_pools}.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=40), evictor=backing)
    for i in range(empty_pools):
        cache.create_pool(E if i % 2 else P, "zbud" if i % 3 else "zsmalloc")
    per = cache.create_pool(P, "zsmalloc")
    eph = cache.create_pool(E, "zbud")
    for start in range(0, 600, 50):
        keys = [(0, i) for i in range(start, start + 50)]
        cache.put_batch(per, keys, [pages[i % 88] for _, i in keys])
        cache.put_batch(eph, keys[:10], [pages[i % 88] for _, i in keys[:10]])
    cache.verify()
    return cache.reaper.lists_inspected, cache.reaper.stats.units_reclaimed


def test_victim_selection_work_does_not_grow_with_empty_pools(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    alone = reclaim_work(0, tmp_path, compressible_pages)
    crowded = reclaim_work(5000, tmp_path, compressible_pages)
    assert alone[1] > 20, "the workload must reclaim"
    assert crowded == alone
    assert alone[0] <= 4 * alone[1]


def test_destroyed_and_recreated_pools_stay_in_lru_order(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=16))
    first = cache.create_pool(E, "zbud")
    cache.put_batch(first, [(0, i) for i in range(10)], compressible_pages[:10])
    cache.destroy_pool(first)
    again = cache.create_pool(E, "zbud", pool_id=first)
    other = cache.create_pool(E, "zbud")
    cache.put_batch(again, [(0, i) for i in range(10)], compressible_pages[:10])
    cache.put_batch(other, [(0, i) for i in range(40)], compressible_pages[10:50])
    assert cache.get_batch(again, [(0, i) for i in range(10)]) == [None] * 10
    cache.verify()


@pytest.mark.parametrize("classes", ["many", "one"])
def test_compaction_toward_a_target_stops_once_met_and_goes_on_later(
    sample_pages: list[bytes], classes: str
) -> None:
    """Compaction inside a reclaim step stops once the step's target is met, after the zspage it
    was emptying (a whole fragmented pool in one call stalled the node for most of a second),
    keeps the pool for the next step, and all the steps together free what one full compaction
    frees: over many size classes, and inside one."""
    pages = sample_pages[:88] if classes == "many" else sample_pages[:1]
    freed_by: dict[bool, int] = {}
    for stepped in (False, True):
        cache = ZCache(ZCacheConfig(pool_limit_frames=20_000))
        pool = cache.create_pool(E)
        keys = [(0, i) for i in range(30_000)]
        cache.put_batch(pool, keys, [pages[i % len(pages)] for i in range(30_000)])
        cache.flush_pages(pool, keys[::2])  # holes in every class
        frames = cache.frames
        if not stepped:
            freed_by[stepped] = cache.reaper.compact()
        else:
            first = cache.reaper.compact(frames - 64)
            assert 64 <= first < freed_by[False] // 2  # met its target, then stopped
            assert cache.pools[pool].zalloc.compactable  # ... with the rest left for later
            total = first
            while step := cache.reaper.compact(cache.frames - 64):
                total += step
            freed_by[stepped] = total
        cache.verify()
        kept = [pages[i % len(pages)] for i in range(1, 30_000, 2)]
        assert cache.get_batch(pool, keys[1::2]) == kept
    assert freed_by[True] == freed_by[False] > 1000
