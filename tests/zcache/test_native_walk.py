# The native walk of a get batch over zsmalloc (native/slots.rs) against Zsmalloc.read/locate:
# the same bytes, the same offsets, the same ticks, a stop at the first handle of another kind;
# a handle that points outside the tables or the arena is an error, never a read out of bounds.
# Through the engine, a batch that mixes every kind of handle reads back every page.
from __future__ import annotations

import random
from pathlib import Path

import pytest

from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig
from ramster.zcache.arena import Arena
from ramster.zcache.backing import BackingFile
from ramster.zcache.handles import HANDLE_MASK, SAME_TAG, ZPAGE_TAG
from ramster.zcache.zsmalloc import MAX_FRAMES, SLOT_BITS, Zsmalloc


@pytest.fixture
def filled() -> tuple[Zsmalloc, list[int]]:
    """A zsmalloc holding zpages of every length class, many straddling two frames, and the
    index handles of them with misses (0) among them."""
    z = Zsmalloc(Arena(4096))
    rng = random.Random(7)
    handles = []
    for tick in range(1, 1500):
        blob = rng.randbytes(rng.randrange(1, PAGE_SIZE + 1))
        handles.append(ZPAGE_TAG | z.alloc(blob, tick))
        if tick % 7 == 0:
            handles.append(0)
    return z, handles


def walk(z: Zsmalloc, handles: list[int], first: int, copy: bool) -> tuple[object, ...]:
    at: list[int] = []
    zpages: list[bytes] = []
    in_place: list[int] = []
    offsets: list[int] = []
    stop, tick, misses = z.walk(
        handles, first, ZPAGE_TAG, HANDLE_MASK, 10_000, copy, at, zpages, in_place, offsets
    )
    return stop, tick, misses, at, zpages, in_place, offsets


def test_walk_copies_what_read_reads(filled: tuple[Zsmalloc, list[int]]) -> None:
    z, handles = filled
    stop, tick, misses, at, zpages, in_place, offsets = walk(z, handles, 0, copy=True)
    live = [i for i, h in enumerate(handles) if h]
    assert (stop, misses, in_place, offsets) == (len(handles), len(handles) - len(live), [], [])
    assert at == live and tick == 10_000 + len(live)
    assert zpages == [z.read(handles[i] ^ ZPAGE_TAG) for i in live]
    last = {(handles[i] ^ ZPAGE_TAG) >> SLOT_BITS: n for n, i in enumerate(live, 10_001)}
    for unit, n in last.items():  # each zspage's tick is that of its last zpage in the batch
        assert z.ticks[unit] == n


def test_walk_in_place_locates_what_locate_locates(filled: tuple[Zsmalloc, list[int]]) -> None:
    z, handles = filled
    stop, _, _, at, zpages, in_place, offsets = walk(z, handles, 5, copy=False)
    assert stop == len(handles)
    straddling = [
        i for i in range(5, len(handles)) if handles[i] and z.locate(handles[i] ^ ZPAGE_TAG) < 0
    ]
    assert straddling and at == straddling  # copied out: they lie in two frames
    assert zpages == [z.read(handles[i] ^ ZPAGE_TAG) for i in straddling]
    assert offsets == [z.locate(handles[i] ^ ZPAGE_TAG) for i in in_place]
    assert sorted(in_place + at) == [i for i in range(5, len(handles)) if handles[i]]


def test_walk_stops_at_another_kind(filled: tuple[Zsmalloc, list[int]]) -> None:
    z, handles = filled
    handles[40] = SAME_TAG | 3
    stop, _, _, at, _, _, _ = walk(z, handles, 0, copy=True)
    assert stop == 40 and max(at) < 40
    assert walk(z, handles, 40, copy=True)[0] == 40  # it stays put: the caller takes that one
    assert walk(z, handles, 41, copy=True)[0] == len(handles)


def test_bad_handles_are_errors(filled: tuple[Zsmalloc, list[int]]) -> None:
    z, handles = filled
    unit = (handles[0] ^ ZPAGE_TAG) >> SLOT_BITS
    big = next(u for u in range(1, len(z.cls)) if z.inuse[u] and z.nframes[u] > 1)
    for bad, why in [
        (len(z.cls) << SLOT_BITS, "zspage id past the table"),
        (big << SLOT_BITS | 255, "slot past its zspage"),
    ]:
        with pytest.raises(ValueError, match=why):
            walk(z, [ZPAGE_TAG | bad], 0, copy=True)
    z.frame[unit * MAX_FRAMES] = 1 << 31  # a frame table gone wrong
    with pytest.raises(ValueError, match="frame past the arena"):
        walk(z, [handles[0]], 0, copy=False)
    with pytest.raises(TypeError):
        walk(z, ["not a handle"], 0, copy=True)  # type: ignore[list-item]


@pytest.mark.parametrize("sealed", [False, True])
def test_engine_reads_every_kind_in_one_batch(
    sample_pages: list[bytes], tmp_path: Path, sealed: bool
) -> None:
    """Zpages, raw pages, same-filled pages, misses and evicted pages in one batch, three times
    (the second get brings evicted pages home, so the walk resumes after promotions)."""
    config = ZCacheConfig(pool_limit_frames=24, store_incompressible_raw=True)
    cache = ZCache(config, evictor=BackingFile(tmp_path / "backing"))
    pool = cache.create_pool(PoolKind.PERSISTENT)
    pages = sample_pages + [bytes(PAGE_SIZE), b"\x5a" * PAGE_SIZE] * 4
    keys = [(1, i) for i in range(len(pages))]
    cache.put_batch(pool, keys, pages)
    asked = [*keys, (2, 0), *keys[::-1]]
    want = [*pages, None, *pages[::-1]]
    assert cache.evicted_pages
    for _ in range(3):
        if sealed:
            got = cache.opened(cache.read_sealed(pool, asked).open())
        else:
            got = cache.get_batch(pool, asked)
        assert got == want
