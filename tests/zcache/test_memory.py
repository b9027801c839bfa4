# Memory behaviour: RSS follows the frames in use, metadata stays compact, density on real corpora.
from __future__ import annotations

import ctypes
from array import array

import pytest

from ramster.bench import engine
from ramster.bench.corpus import load_corpus
from ramster.bench.report import rss_bytes
from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig, arena
from ramster.zcache.arena import MIN_WARM, POPULATE, WARM, Arena
from tests.conftest import DATA

MiB = 1 << 20


def arena_rss(space: Arena) -> int:
    """Resident bytes of an arena's mapping, from /proc/self/pagemap (bit 63 of a page's entry:
    present): what its frames hold, whatever the heap around it keeps of what the test freed
    (glibc keeps some, by its own rules) and whichever mappings the kernel merged with it."""
    view = ctypes.c_char.from_buffer(space.map)
    start = ctypes.addressof(view)
    del view  # an export would keep the map from closing
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // PAGE_SIZE * 8)
        entries = array("Q", f.read(space.capacity * 8))
    return sum(entry >> 63 for entry in entries) * PAGE_SIZE


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
def test_rss_follows_pool_size(allocator: str, compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=1 << 16))
    pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
    n = 30_000
    keys = [(0, i) for i in range(n)]
    base = rss_bytes()
    for start in range(0, n, 1000):
        batch = keys[start : start + 1000]
        cache.put_batch(pool, batch, [compressible_pages[i % 88] for _, i in batch])
    grown = rss_bytes() - base
    held = cache.frames * PAGE_SIZE
    assert held > 32 * MiB
    assert grown >= 0.9 * held  # the frames really are resident
    assert held <= arena_rss(cache.arena) <= held + 2 * POPULATE * PAGE_SIZE
    cache.flush_object(pool, 0)
    assert cache.frames == 0
    assert arena_rss(cache.arena) <= (WARM + POPULATE) * PAGE_SIZE  # and really given back
    assert rss_bytes() - base < 0.25 * held  # the process's too, heap noise aside
    cache.close()


def test_arena_faults_frames_in_a_few_at_a_time() -> None:
    space = Arena(1 << 14)
    base = rss_bytes()
    first = space.alloc()
    assert (POPULATE - 1) * PAGE_SIZE <= rss_bytes() - base < 2 * POPULATE * PAGE_SIZE
    frames = [first] + [space.alloc() for _ in range(POPULATE - 1)]
    assert rss_bytes() - base < 2 * POPULATE * PAGE_SIZE, "frames ahead were faulted twice"
    assert frames == list(range(POPULATE))
    space.close()


@pytest.mark.parametrize(
    ("capacity", "warm"), [(1 << 10, MIN_WARM), (1 << 14, (1 << 14) // 64), (1 << 18, WARM)]
)
def test_freed_frames_kept_warm_cover_a_batch_but_not_a_small_arena(
    capacity: int, warm: int
) -> None:
    """The frames freed last stay faulted in, up to WARM, or a 64th of a smaller arena (never
    fewer than MIN_WARM); the rest go back to the OS; the warm ones are handed out first."""
    space = Arena(capacity)
    frames = [space.alloc() for _ in range(min(capacity, 2 * WARM))]
    for frame in frames:
        space.view[frame * PAGE_SIZE] = 1
    for frame in frames:
        space.free(frame)
    kept = [f for f in frames if space.map[f * PAGE_SIZE] == 1]  # DONTNEED zeroes the others
    assert kept == frames[:warm]
    assert sorted(space.alloc() for _ in range(warm)) == sorted(kept)
    for frame in kept:
        space.free(frame)
    assert space.cool() == warm  # traffic paused: the warm ones go back too
    assert not any(space.map[f * PAGE_SIZE] for f in frames) and space.in_use == 0
    space.close()


def test_arena_without_populate_advice_lets_frames_fault_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(arena, "MADV_POPULATE_WRITE", -1)  # no kernel knows it: EINVAL
    space = Arena(64)
    frames = [space.alloc() for _ in range(64)]
    assert frames == list(range(64)) and space.alloc() == -1
    for frame in frames:
        space.view[frame * PAGE_SIZE : frame * PAGE_SIZE + 3] = b"abc"
    assert all(space.map[f * PAGE_SIZE : f * PAGE_SIZE + 3] == b"abc" for f in frames)
    space.close()


def test_lent_frames_come_in_alloc_order_and_go_back_warm() -> None:
    twin, space = Arena(64), Arena(64)
    for a in (twin, space):  # the same history: frames 0..9 taken, 3 freed warm
        held = [a.alloc() for _ in range(10)]
        for frame in held[2:5]:
            a.free(frame)
    lent: list[int] = []
    space.lend(lent, 8)
    assert lent[::-1] == [twin.alloc() for _ in range(8)]  # taken from the end
    assert space.in_use == twin.in_use == 15
    rest = lent[:5]  # three used, five given back: the next allocs take them first
    space.give_back(rest)
    assert space.in_use == 10 and [space.alloc() for _ in range(5)] == rest[::-1]
    space.limit = space.in_use + 2  # at most two more
    more: list[int] = []
    space.lend(more, 8)
    assert len(more) == 2 and space.in_use == space.limit
    space.lend(more, 8)
    space.limit = 3  # a limit lowered under what is in use lends nothing, takes nothing back
    space.lend(more, 8)
    assert len(more) == 2 and space.in_use == 17
    for a in (twin, space):
        a.close()


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
def test_metadata_is_compact(allocator: str, compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=1 << 17))
    pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
    n = 100_000
    for start in range(0, n, 1000):
        keys = [(start // 50_000, i) for i in range(start, start + 1000)]
        cache.put_batch(pool, keys, [compressible_pages[i % 88] for _, i in keys])
    assert cache.stored_pages == n
    assert cache.metadata_bytes() / n <= 64
    cache.close()


TARGETS = [  # pages per frame with the corpus cycled to 8192 pages (bounds: 2.70 and 6.49)
    ("python-node.pages", "zsmalloc", 2.5),
    ("python-node.pages", "zbud", 1.9),
    ("dockerd.pages", "zsmalloc", 6.2),
    ("dockerd.pages", "zbud", 1.95),
]


@pytest.mark.parametrize(("corpus", "allocator", "target"), TARGETS)
def test_density_on_real_process_memory(corpus: str, allocator: str, target: float) -> None:
    pages = load_corpus(DATA / corpus)
    result = engine.run(pages, allocator, 8192)
    assert result["verified"]
    assert result["pages_per_frame"] >= target
    assert result["pages_per_frame"] <= result["bound_pages_per_frame"]


@pytest.mark.parametrize("store_raw", [False, True])
def test_incompressible_pages_are_refused_or_stored_raw(
    store_raw: bool, incompressible_pages: list[bytes]
) -> None:
    pages = incompressible_pages * 64
    result = engine.run(pages, "zsmalloc", len(pages), store_raw=store_raw)
    assert result["verified"]
    if store_raw:
        assert result["stored_raw"] == len(pages)
    else:
        assert result["refused"]["poor_compression"] == len(pages)
        assert result["frames"] == 0
