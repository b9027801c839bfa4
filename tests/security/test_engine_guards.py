# Regression tests for oversize zpages: a zpage longer than a frame used to make zbud write past
# its frame (into a neighbour's) and zsmalloc raise IndexError.  Every allocator and
# store_zpages now refuse it with InvalidPage before anything changes.
from __future__ import annotations

import pytest

from ramster.zcache import InvalidPage, PoolKind, ZCache, ZCacheConfig
from ramster.zcache.arena import Arena
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE, make_zpage
from ramster.zcache.rawframes import RAW_ZPAGE, RawFrames
from ramster.zcache.zbud import Zbud
from ramster.zcache.zsmalloc import Zsmalloc

# intact zpages (their checksum holds) that fit no frame: just over a frame, and the largest
OVERSIZE = [
    make_zpage(7, 1, bytes(range(256)) * 15 + bytes(PAGE_SIZE - HEADER_SIZE + 1 - 3840)),
    make_zpage(7, 2, b"\x5a" * (PAGE_SIZE - 1)),
]


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
def test_store_zpages_refuses_oversize_and_keeps_neighbours(
    allocator: str, compressible_pages: list[bytes]
) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=8))
    pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
    keys = [(1, i) for i in range(4)]
    cache.put_batch(pool, keys, compressible_pages[:4])
    frames = cache.frames
    for zpage in OVERSIZE:
        assert PAGE_SIZE < len(zpage) < RAW_ZPAGE
        with pytest.raises(InvalidPage, match="fits no frame"):
            cache.store_zpages(pool, [zpage])
        # a good zpage in the same batch does not get in either: the batch is refused whole
        good = make_zpage(9, 9, b"x" * 100)
        with pytest.raises(InvalidPage):
            cache.store_zpages(pool, [good, zpage])
    assert cache.frames == frames
    assert cache.pool(pool).index.count == 4
    assert cache.get_batch(pool, keys) == compressible_pages[:4]
    cache.verify()


@pytest.mark.parametrize("kind", [Zbud, Zsmalloc])
def test_allocators_refuse_what_fits_no_frame(kind: type[Zbud] | type[Zsmalloc]) -> None:
    arena = Arena(4)
    alloc = kind(arena)
    neighbour = alloc.alloc(b"n" * 2000, 1)
    before = bytes(arena.map[: 4 * PAGE_SIZE])
    for zpage in (*OVERSIZE, b""):
        with pytest.raises(InvalidPage):
            alloc.alloc(zpage, 2)
    assert bytes(arena.map[: 4 * PAGE_SIZE]) == before
    assert (alloc.zpages, alloc.frames, arena.in_use) == (1, 1, 1)
    assert bytes(alloc.read(neighbour))[:2000] == b"n" * 2000


def test_raw_frames_take_only_raw_zpages() -> None:
    arena = Arena(2)
    raw = RawFrames(arena)
    for zpage in (OVERSIZE[0], make_zpage(1, 1, b"y" * PAGE_SIZE) + b"!", b""):
        with pytest.raises(InvalidPage):
            raw.alloc(zpage, 1)
    assert (raw.zpages, arena.in_use) == (0, 0)
    page = make_zpage(1, 1, b"y" * PAGE_SIZE)
    assert raw.read(raw.alloc(page, 1)) == page
