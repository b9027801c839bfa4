# Compressed-zpage interface used between nodes: store_zpages, read_zpages, evicted_locations.
from __future__ import annotations

from pathlib import Path

import pytest

from ramster.zcache import InvalidPage, PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile
from ramster.zcache.codec import open_zpage


def test_zpages_travel_between_caches_compressed(
    compressible_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    owner = ZCache(ZCacheConfig(pool_limit_frames=64, store_incompressible_raw=True))
    holder = ZCache(ZCacheConfig(pool_limit_frames=64))
    src = owner.create_pool(PoolKind.PERSISTENT)
    dst = holder.create_pool(PoolKind.PERSISTENT, "zbud")
    pages = [*compressible_pages[:10], incompressible_pages[0], bytes(4096)]
    keys = [(9, i) for i in range(len(pages))]
    owner.put_batch(src, keys, pages)
    zpages = owner.read_zpages(src, keys)
    assert all(z is not None for z in zpages)
    sent = [z for z in zpages if z is not None]
    assert holder.store_zpages(dst, sent)[10] is PutResult.STORED_RAW
    back = holder.read_zpages(dst, keys, exclusive=True)
    assert back == sent
    assert [open_zpage(z, *k) for z, k in zip(sent, keys, strict=True)] == pages
    assert holder.stored_pages == 0
    holder.verify()


def test_store_zpages_refuses_damaged_zpages(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=16))
    pool = cache.create_pool(PoolKind.PERSISTENT)
    cache.put(pool, 1, 1, compressible_pages[0])
    (zpage,) = cache.read_zpages(pool, [(1, 1)])
    assert zpage is not None
    bad = bytearray(zpage)
    bad[-1] ^= 1
    other = cache.create_pool(PoolKind.PERSISTENT)
    for damaged in (bytes(bad), zpage + b"\0", zpage[:-1], b""):
        with pytest.raises(InvalidPage):
            cache.store_zpages(other, [damaged])
    assert cache.pool(other).index.count == 0


def test_evicted_locations(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=8), evictor=backing)
    pool = cache.create_pool(PoolKind.PERSISTENT)
    keys = [(0, i) for i in range(60)]
    cache.put_batch(pool, keys, compressible_pages[:60])
    locations = cache.evicted_locations(pool, keys)
    assert sum(1 for loc in locations if loc) == cache.evicted_pages > 0
    on_disk = [k for k, loc in zip(keys, locations, strict=True) if loc]
    assert all(z is not None for z in cache.read_zpages(pool, on_disk))
