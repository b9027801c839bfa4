# zsmalloc's native paths (native/slots.rs) against its Python ones.  The walk of a get batch
# against Zsmalloc.read/locate: the same bytes, offsets and ticks, a stop at the first handle of
# another kind; a handle that points outside the tables or the arena is an error, never a read
# out of bounds.  The filing of a put batch against alloc() page by page: two allocators fed the
# same batches and frees, through a full arena, end in the same state, table for table and byte
# for byte.  Through the engine, a batch that mixes every kind of page reads back every page.
from __future__ import annotations

import random
import select
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.zcache import PAGE_SIZE, Encodings, PoolKind, ZCache, ZCacheConfig
from ramster.zcache._codec import CodecPool, Zpages, encode_pages
from ramster.zcache.arena import Arena
from ramster.zcache.backing import BackingFile
from ramster.zcache.handles import HANDLE_MASK, RAW_TAG, SAME_TAG, ZPAGE_TAG
from ramster.zcache.zsmalloc import (
    _LENGTH_CLASS,
    _SLOTS,
    MAX_FRAMES,
    SLOT_BITS,
    SLOT_MASK,
    WORDS,
    Zsmalloc,
)
from tests.zcache.test_zsmalloc import check_accounting


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
    """z.walk(), with the zpages it copied cut out of its buffer at their starts."""
    at: list[int] = []
    copied = bytearray()
    starts: list[int] = []
    in_place: list[int] = []
    offsets: list[int] = []
    stop, tick, misses = z.walk(
        handles, first, ZPAGE_TAG, HANDLE_MASK, 10_000, copy, at, copied, starts, in_place, offsets
    )
    assert len(starts) == len(at)
    ends = [*starts[1:], len(copied)][: len(starts)]
    zpages = [bytes(copied[s:e]) for s, e in zip(starts, ends, strict=True)]
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
    """Zpages (some straddling two frames), raw pages, same-filled pages, misses and evicted
    pages in one batch, three times (the second get brings evicted pages home, so the walk
    resumes after promotions); every page counted once, as a hit or a miss."""
    config = ZCacheConfig(pool_limit_frames=48, store_incompressible_raw=True)
    cache = ZCache(config, evictor=BackingFile(tmp_path / "backing"))
    pool = cache.create_pool(PoolKind.PERSISTENT)
    pages = sample_pages + [bytes(PAGE_SIZE), b"\x5a" * PAGE_SIZE] * 4
    keys = [(1, i) for i in range(len(pages))]
    cache.put_batch(pool, keys, pages)
    asked = [*keys, (2, 0), *keys[::-1]]
    want = [*pages, None, *pages[::-1]]
    zsmalloc = cache.pool(pool).zalloc
    in_ram = [h ^ ZPAGE_TAG for h in cache.pool(pool).index.get_many(keys) if h >> 56 == 1]
    assert cache.evicted_pages and any(zsmalloc.locate(h) < 0 for h in in_ram)  # straddling
    for _ in range(3):
        if sealed:
            got = cache.opened(cache.read_sealed(pool, asked).open())
        else:
            got = cache.get_batch(pool, asked)
        assert got == want
    stats = cache.stats  # every page counted once: a hit or a miss
    assert (stats.hits, stats.misses, stats.corrupt) == (3 * 2 * len(pages), 3, 0)


def file_natively(z: Zsmalloc, items: list[bytes | None], tick: int) -> tuple[list[int], int]:
    """Index handles of `items` as ZCache files them: natively while it can, else by alloc()
    (0: refused, or not a zpage); and the last tick."""
    handles: list[int] = []
    results: list[str | None] = []
    words: list[int] = []
    i = -1
    while (i := i + 1) < len(items):
        i, tick = z.file(items, i, ZPAGE_TAG, tick, "stored", handles, results, words)
        for at in words:  # passed over, standing in as 0 and None
            item = items[at]
            assert item is not None and len(item) == 8 and (handles[at], results[at]) == (0, None)
            results[at] = "refused"  # not a zpage: file_in_python's 0
        words.clear()
        if i == len(items):
            break
        item = items[i]
        handle = -1
        if item is not None and 18 < len(item) <= PAGE_SIZE:
            tick += 1
            handle = z.alloc(item, tick)
        handles.append(ZPAGE_TAG | handle if handle >= 0 else 0)
        results.append("stored" if handle >= 0 else "refused")
    assert results == ["stored" if h else "refused" for h in handles]
    return handles, tick


def file_in_python(z: Zsmalloc, items: list[bytes | None], tick: int) -> tuple[list[int], int]:
    handles = []
    for item in items:
        handle = -1
        if item is not None and 18 < len(item) <= PAGE_SIZE:
            tick += 1
            handle = z.alloc(item, tick)
        handles.append(ZPAGE_TAG | handle if handle >= 0 else 0)
    return handles, tick


def same_state(a: Zsmalloc, b: Zsmalloc, live: list[int]) -> None:
    """The same zspages in the same state (the native filing grows the tables ahead of
    alloc(), so they are compared zspage by zspage), the same classes' state and counts."""
    zspages = sorted(a.lru)
    assert zspages == sorted(b.lru)
    for name in ("hot", "waste"):
        assert getattr(a, name) == getattr(b, name), name
    for zid in zspages:
        for name in ("cls", "inuse", "nframes", "group", "edge", "ticks"):
            assert getattr(a, name)[zid] == getattr(b, name)[zid], name
        assert a.used[zid * WORDS : (zid + 1) * WORDS] == b.used[zid * WORDS : (zid + 1) * WORDS]
        base = zid * MAX_FRAMES
        assert a.frame[base : base + a.nframes[zid]] == b.frame[base : base + b.nframes[zid]]
    assert (a.zpages, a.frames, a.compactable) == (b.zpages, b.frames, b.compactable)
    assert a.groups == b.groups and a.arena.in_use == b.arena.in_use
    for handle in live:
        assert a.read(handle ^ ZPAGE_TAG) == b.read(handle ^ ZPAGE_TAG)
    check_accounting(a)


# any length, the other kinds, and a few lengths whose zspages fill, empty and get picked again
LENGTHS = st.one_of(
    st.integers(19, PAGE_SIZE), st.sampled_from([0, 8, 18, 4114, -1]), st.sampled_from([700, 2600])
)


@settings(max_examples=80, deadline=None)
@given(
    frames=st.integers(1, 48),
    rounds=st.lists(
        st.tuples(st.lists(LENGTHS, min_size=1, max_size=40), st.lists(st.integers(0, 10**6))),
        min_size=1,
        max_size=12,
    ),
)
def test_native_filing_is_alloc(frames: int, rounds: list[tuple[list[int], list[int]]]) -> None:
    """Batches of zpages of any length (and words, raw pages and refusals among them), each
    followed by frees of some live zpages (free_many against free()), until and past a full
    arena."""
    native, python = Zsmalloc(Arena(frames)), Zsmalloc(Arena(frames))
    rng = random.Random(frames)
    live: list[int] = []
    tick_n = tick_p = 0
    for lengths, frees in rounds:
        items = [None if n < 0 else rng.randbytes(n) for n in lengths]
        got, tick_n = file_natively(native, items, tick_n)
        want, tick_p = file_in_python(python, items, tick_p)
        assert got == want and tick_n == tick_p
        live += [h for h in got if h]
        gone = [live.pop(n % len(live)) for n in frees[: len(live) // 2]]
        batch = list(gone)  # words are passed over, raw pages stop the native runs
        for at in range(len(gone), -1, -5):
            batch.insert(at, (SAME_TAG, RAW_TAG)[at % 2] | at)
        i, words = 0, []
        while (i := native.free_many(batch, i, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, words)) < len(
            batch
        ):
            assert batch[i] >> 56 == RAW_TAG >> 56
            i += 1
        assert words == [at for at, h in enumerate(batch) if h >> 56 == SAME_TAG >> 56]
        for handle in gone:
            python.free(handle ^ ZPAGE_TAG)
        same_state(native, python, live)


def test_filing_stops_where_python_must_take_over(sample_pages: list[bytes]) -> None:
    z = Zsmalloc(Arena(64))
    blob = sample_pages[0][:1000]
    handles: list[int] = []
    results: list[str] = []
    # no hot zspage yet for the class: the native call files nothing, the wrapper starts one
    none: list[int] = []
    native = _SLOTS.file(z, [blob], 0, ZPAGE_TAG, 0, "stored", handles, results, [], [], [], none)
    assert native[:3] == (0, 0, 0)
    assert z.file([blob], 0, ZPAGE_TAG, 0, "stored", handles, results, none) == (1, 1)
    assert z.lru.live == 1 and z.ticks[z.hot[_LENGTH_CLASS[len(blob)]]] == 1
    items: list[bytes | None] = [blob, blob, None, blob]
    assert z.file(items, 0, ZPAGE_TAG, 1, "stored", handles, results, none) == (2, 3)
    assert results == ["stored"] * 3 and len(set(handles)) == 3
    assert z.file(items, 3, ZPAGE_TAG, 3, "stored", handles, results, none) == (4, 4)
    assert [z.read(h ^ ZPAGE_TAG)[:1000] for h in handles] == [blob] * 4
    words = [blob, b"\1" * 8, b"\0" * 8, blob, b"\1" * 4114, blob]  # a raw page stops it
    assert z.file(words, 0, ZPAGE_TAG, 4, "stored", handles, results, none) == (4, 6)
    assert none == [1, 2] and handles[-3:-1] == [0, 0]
    assert results[-4:] == ["stored", None, None, "stored"] and len(handles) == 8
    zid = (handles[0] ^ ZPAGE_TAG) >> SLOT_BITS
    z.used[zid * WORDS : (zid + 1) * WORDS] = array("Q", [(1 << 64) - 1] * WORDS)  # gone wrong
    with pytest.raises(ValueError, match="hot zspage with no free slot"):
        z.file([blob], 0, ZPAGE_TAG, 5, "stored", handles, results, none)


def test_native_filing_refills_the_fullest_zspages_first() -> None:
    """Zspages of one class left at different fullness by frees (native and Python frees): the
    filing makes them hot again fullest first, as alloc() does, before any new zspage."""
    native, python = Zsmalloc(Arena(512)), Zsmalloc(Arena(512))
    rng = random.Random(7)
    items: list[bytes | None] = [rng.randbytes(700) for _ in range(4 * 64)]
    first, tick = file_natively(native, items, 0)
    assert (first, tick) == file_in_python(python, items, 0)
    for zspage, frees in ((0, 40), (1, 10), (2, 30)):
        gone = first[zspage * 64 : zspage * 64 + frees]
        assert native.free_many(gone, 0, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, []) == len(gone)
        for handle in gone:
            python.free(handle ^ ZPAGE_TAG)
    same_state(native, python, [])
    items = [rng.randbytes(700) for _ in range(100)]
    got, tick_n = file_natively(native, items, tick)
    want, tick_p = file_in_python(python, items, tick)
    assert got == want and tick_n == tick_p
    zspages = [h >> SLOT_BITS & HANDLE_MASK >> SLOT_BITS for h in got]
    assert zspages == [2] * 10 + [3] * 30 + [1] * 40 + [5] * 20  # fullest first, then a new one
    same_state(native, python, got)


def test_batch_frees_refuse_bad_handles(sample_pages: list[bytes]) -> None:
    z = Zsmalloc(Arena(64))
    handles = [ZPAGE_TAG | z.alloc(sample_pages[0][:900], t) for t in (1, 2, 3)]
    assert z.free_many(handles[:1], 0, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, []) == 1 and z.zpages == 2
    with pytest.raises(ValueError, match="not in use"):  # freed already
        z.free_many(handles[:1], 0, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, [])
    with pytest.raises(ValueError, match="past the table"):
        z.free_many([ZPAGE_TAG | 10**6 << SLOT_BITS], 0, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, [])
    with pytest.raises(ValueError, match="past its zspage"):
        z.free_many([handles[1] | SLOT_MASK], 0, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, [])
    assert z.zpages == 2
    check_accounting(z)


def worker_encodings(
    keys: list[tuple[int, int]], pages: list[bytes], threshold: int, store_raw: bool
) -> Zpages:
    """A codec worker's encodings of `pages` (what the node's put hops file)."""
    workers = CodecPool(1, "test_")
    try:
        workers.encode(keys, pages, threshold, store_raw)
        finished: list[tuple[int, Zpages | list[bytes | str] | RuntimeError]] = []
        while not finished:
            select.select([workers.fileno()], [], [], 10)
            finished = workers.finished()
        ((_, zpages),) = finished
        assert isinstance(zpages, Zpages)
        return zpages
    finally:
        workers.close()


def mixed_pages(sample_pages: list[bytes]) -> list[bytes]:
    """Compressible and incompressible pages, with same-filled ones among them."""
    words = [bytes(PAGE_SIZE), b"\x5a" * PAGE_SIZE, b"\1\2\3\4\5\6\7\x08" * 512]
    return [p for i, page in enumerate(sample_pages) for p in (page, words[i % 3])[: 1 + i % 2]]


def test_worker_encodings_are_the_codecs_list(sample_pages: list[bytes]) -> None:
    pages = mixed_pages(sample_pages)
    keys = [(3, i) for i in range(len(pages))]
    for store_raw in (True, False):  # raw pages, or refusals (None)
        want = encode_pages(keys, pages, 2048, store_raw)
        got = worker_encodings(keys, pages, 2048, store_raw)
        assert len(got) == len(want) and list(got) == want
        assert None in want if not store_raw else any(len(z or b"") == 4114 for z in want)
        assert (got[-1], got[-len(want)]) == (want[-1], want[0])
        for beyond in (len(want), -len(want) - 1):
            with pytest.raises(IndexError):
                got[beyond]


def test_filing_worker_encodings_is_filing_the_list(sample_pages: list[bytes]) -> None:
    """The native filing reads a worker's Zpages in place: the same handles, tables, arena and
    pages as from encode_pages' list, through every kind of encoding and a full arena."""
    pages = mixed_pages(sample_pages)
    keys = [(3, i) for i in range(len(pages))]
    for store_raw, frames in ((True, 16), (False, 16), (True, 4096)):
        caches = [ZCache(ZCacheConfig(pool_limit_frames=frames)) for _ in range(2)]
        pools = [c.create_pool(PoolKind.PERSISTENT, store_raw=store_raw) for c in caches]
        listed = encode_pages(keys, pages, caches[0].encoder(pools[0]).threshold, store_raw)
        packed = worker_encodings(keys, pages, caches[1].encoder(pools[1]).threshold, store_raw)
        encodings: tuple[Encodings, Encodings] = (listed, packed)
        got = [c.file_encoded(p, keys, e) for c, p, e in zip(caches, pools, encodings, strict=True)]
        assert got[0] == got[1]
        zallocs = [c.pool(p).zalloc for c, p in zip(caches, pools, strict=True)]
        assert isinstance(zallocs[0], Zsmalloc) and isinstance(zallocs[1], Zsmalloc)
        live = [h for h in caches[0].pool(pools[0]).index.get_many(keys) if h >> 56 == 1]
        same_state(zallocs[0], zallocs[1], live)
        read = [c.get_batch(p, keys) for c, p in zip(caches, pools, strict=True)]
        assert read[0] == read[1]
        for i, (result, page) in enumerate(zip(got[1], read[1], strict=True)):
            assert result.refused or page == pages[i]
        for cache in caches:
            cache.close()
