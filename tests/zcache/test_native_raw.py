# Raw frames' native runs (native/raw.rs) against RawFrames.alloc/free page by page: two
# allocators fed the same batches and frees, through a full arena, end in the same state (ids,
# frames, headers, bytes, LRU order and counts); a run stops where Python must take over (the
# first page of an empty LRU list, the arena's limit, anything not a raw zpage); a free of a
# frame not in use is an error, never a corrupted table.  Through the engine, an NBD-shaped
# rewrite of raw pages reads back every page.
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.zcache import PAGE_SIZE, PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.arena import Arena
from ramster.zcache.codec import HEADER_SIZE
from ramster.zcache.handles import HANDLE_MASK, RAW_TAG
from ramster.zcache.rawframes import RawFrames

STORED = PutResult.STORED_RAW


def raw_zpage(n: int) -> bytes:
    """A raw zpage: a header (made up: the allocator keeps it as it is) and a random page."""
    return n.to_bytes(HEADER_SIZE, "little") + os.urandom(PAGE_SIZE)


def file_natively(r: RawFrames, items: list[bytes], tick: int) -> tuple[list[int], int]:
    """A batch through file_run, what it leaves to alloc() page by page (as the engine does)."""
    handles: list[int] = []
    results: list[object] = []
    i = 0
    while i < len(items):
        i, tick = r.file_run(items, i, RAW_TAG, tick, STORED, handles, results)
        if i < len(items):  # the first page of an empty list, or the arena is full
            tick += 1
            handle = r.alloc(items[i], tick)
            handles.append(RAW_TAG | handle if handle >= 0 else 0)
            results.append(STORED if handle >= 0 else None)
            i += 1
    assert results == [STORED if h else None for h in handles]
    return handles, tick


def file_in_python(r: RawFrames, items: list[bytes], tick: int) -> tuple[list[int], int]:
    handles = []
    for item in items:
        tick += 1
        handle = r.alloc(item, tick)
        handles.append(RAW_TAG | handle if handle >= 0 else 0)
    return handles, tick


def same_state(a: RawFrames, b: RawFrames) -> None:
    assert (a.zpages, a.frames, a.lru.live) == (b.zpages, b.frames, b.lru.live)
    assert a.arena.in_use == b.arena.in_use
    live = sorted(a.lru)
    assert live == sorted(b.lru)
    for rid in live:
        assert a.frame[rid] == b.frame[rid]
        assert a.header[rid] == b.header[rid]
        assert (a.lru.tick[rid], a.lru.queued[rid]) == (b.lru.tick[rid], b.lru.queued[rid])
        assert a.read(rid) == b.read(rid)
    heap = a.lru._heap
    assert all(heap[(k - 1) // 2] <= heap[k] for k in range(1, len(heap)))  # still a heap
    assert a.lru.oldest() == b.lru.oldest()


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(4, 48),
    rounds=st.lists(
        st.tuples(st.integers(0, 40), st.floats(0, 1), st.booleans()), min_size=1, max_size=6
    ),
)
def test_native_runs_are_alloc_and_free(frames: int, rounds: list[tuple[int, float, bool]]) -> None:
    native, python = RawFrames(Arena(frames)), RawFrames(Arena(frames))
    rng = random.Random(frames)
    live: list[int] = []  # handles stored in both (they agree: checked as they come)
    tick = 0
    for size, freed, touch in rounds:
        items = [raw_zpage(n) for n in range(size)]
        got, _ = file_natively(native, items, tick)
        want, tick = file_in_python(python, items, tick)
        assert got == want
        live += [h for h in got if h]
        same_state(native, python)
        if touch and live:  # a get touches its unit: the LRU order moves
            tick += 1
            rid = rng.choice(live) ^ RAW_TAG
            native.lru.tick[rid] = python.lru.tick[rid] = tick
        rng.shuffle(live)
        cut = int(len(live) * freed)
        gone, live = live[:cut], live[cut:]
        assert native.free_run(gone, 0, RAW_TAG, HANDLE_MASK) == len(gone)
        for handle in gone:
            python.free(handle ^ RAW_TAG)
        same_state(native, python)


def test_runs_stop_where_python_takes_over() -> None:
    r = RawFrames(Arena(4))
    items = [raw_zpage(n) for n in range(6)]
    handles: list[int] = []
    results: list[object] = []
    # an empty LRU list: its first push wakes the heap over all lists, which alloc() does
    assert r.file_run(items, 0, RAW_TAG, 0, STORED, handles, results) == (0, 0)
    assert r.alloc(items[0], 1) >= 0
    # then a run, up to the arena's limit
    assert r.file_run(items, 1, RAW_TAG, 1, STORED, handles, results) == (4, 4)
    assert len(handles) == 3 and r.arena.in_use == 4
    # anything but a raw zpage ends a run where it stands
    assert r.file_run([items[4][:100]], 0, RAW_TAG, 4, STORED, [], []) == (0, 4)
    # a free of a frame not in use, or past the tables, is an error
    with pytest.raises(ValueError, match="not in use"):
        r.free_run([handles[0], handles[0]], 0, RAW_TAG, HANDLE_MASK)
    assert (r.zpages, r.frames, r.arena.in_use) == (3, 3, 3)  # the first free went through
    with pytest.raises(ValueError, match="past the tables"):
        r.free_run([RAW_TAG | 10**6], 0, RAW_TAG, HANDLE_MASK)
    # and a run of handles stops at another kind
    assert r.free_run([handles[1], 5], 0, RAW_TAG, HANDLE_MASK) == 1


def test_a_rewrite_of_raw_pages_reads_back(sample_pages: list[bytes]) -> None:
    engine = ZCache(ZCacheConfig(pool_limit_frames=2048))
    pool = engine.create_pool(PoolKind.PERSISTENT, store_raw=True)
    keys = [(0, i) for i in range(600)]
    for _ in range(3):  # each rewrite frees a run of raw pages and files another
        pages = [os.urandom(PAGE_SIZE) for _ in keys]
        pages[100:110] = sample_pages[:10]  # a few zpages in between
        results = engine.put_batch(pool, keys, pages)
        assert results.count(PutResult.STORED_RAW) == 590
        assert engine.get_batch(pool, keys) == pages
        engine.verify()
    assert engine.pool_frames(pool) == 590 + engine.pool(pool).zalloc.frames
    oldest = engine.pool(pool).raw.lru.oldest()
    assert engine.pool(pool).raw.read(oldest)[HEADER_SIZE:] == pages[0]
    heap = engine.pool(pool).raw.lru._heap
    assert all(heap[(k - 1) // 2] <= heap[k] for k in range(1, len(heap)))
