# The batch paths in halves (encode / file a put, read out / open a get): together they do what
# put_batch and get_batch do, the pure halves run on other threads while the engine changes, and
# the counters only count a page once it is opened.
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ramster.zcache import (
    PAGE_SIZE,
    CorruptPage,
    InvalidPage,
    PoolKind,
    PutResult,
    ZCache,
    ZCacheConfig,
    check_put_batch,
)
from ramster.zcache.codec import HEADER_SIZE

P, E = PoolKind.PERSISTENT, PoolKind.EPHEMERAL
ZERO = bytes(PAGE_SIZE)


def mixed(sample_pages: list[bytes]) -> list[bytes]:
    """Compressible, incompressible and same-filled pages, and one key's page twice."""
    return [*sample_pages, ZERO, b"\x07" * PAGE_SIZE, sample_pages[0]]


def keys_for(pages: list[bytes]) -> list[tuple[int, int]]:
    keys = [(1, i) for i in range(len(pages))]
    keys[-1] = keys[0]  # a duplicate key in the batch: the last page wins
    return keys


@pytest.mark.parametrize("store_raw", [False, True])
def test_encode_then_file_is_put_batch(sample_pages: list[bytes], store_raw: bool) -> None:
    pages = mixed(sample_pages)
    keys = keys_for(pages)
    whole, halves = ZCache(), ZCache()
    a = whole.create_pool(P, store_raw=store_raw)
    b = halves.create_pool(P, store_raw=store_raw)
    expected = whole.put_batch(a, keys, pages)
    encoded = halves.encoder(b).encode(keys, check_put_batch(keys, pages))
    assert halves.file_encoded(b, keys, encoded) == expected
    assert (PutResult.STORED_RAW in expected) is store_raw
    assert PutResult.SAME_FILLED in expected
    assert halves.get_batch(b, keys) == whole.get_batch(a, keys)
    assert halves.stats == whole.stats
    halves.verify()


def test_file_encoded_refuses_a_mismatched_batch(sample_pages: list[bytes]) -> None:
    cache = ZCache()
    pool = cache.create_pool(P)
    encoded = cache.encoder(pool).encode([(1, 0)], sample_pages[:1])
    with pytest.raises(InvalidPage):
        cache.file_encoded(pool, [(1, 0), (1, 1)], encoded)
    assert cache.stored_pages == 0 and cache.stats.puts == 0


@pytest.mark.parametrize("exclusive", [False, True])
def test_read_out_pages_survive_the_engine_reusing_their_frames(
    sample_pages: list[bytes], exclusive: bool
) -> None:
    """A get's zpages are copied out: flushing the keys and filling the freed frames with other
    pages before open() changes nothing it returns."""
    cache = ZCache(ZCacheConfig(pool_limit_frames=256))
    pool = cache.create_pool(P, store_raw=True)
    keys = [(1, i) for i in range(len(sample_pages))]
    cache.put_batch(pool, keys, sample_pages)
    sealed = cache.read_sealed(pool, keys, exclusive)
    cache.flush_object(pool, 1)
    reversed_pages = sample_pages[::-1]
    cache.put_batch(pool, [(2, i) for i in range(len(sample_pages))], reversed_pages)
    assert cache.opened(sealed.open()) == sample_pages
    cache.verify()


def test_open_runs_on_other_threads_while_the_engine_changes(sample_pages: list[bytes]) -> None:
    cache = ZCache()
    pool = cache.create_pool(P, store_raw=True)
    keys = [(1, i) for i in range(len(sample_pages))]
    cache.put_batch(pool, keys, sample_pages)
    with ThreadPoolExecutor(2) as workers:
        pending = [workers.submit(cache.read_sealed(pool, keys).open) for _ in range(20)]
        for n, page in enumerate(sample_pages):  # the loop's side goes on meanwhile
            cache.put(pool, 2, n, page)
        results = [cache.opened(done.result()) for done in pending]
    assert all(pages == sample_pages for pages in results)
    assert cache.stats.hits == 20 * len(sample_pages)


def test_opened_counts_hits_and_corruption_when_they_are_known(sample_pages: list[bytes]) -> None:
    cache = ZCache()
    pool = cache.create_pool(P)
    keys = [(1, 0), (1, 1), (1, 2)]
    cache.put_batch(pool, keys[:2], sample_pages[:2])
    sealed = cache.read_sealed(pool, keys)
    assert (cache.stats.gets, cache.stats.misses, cache.stats.hits) == (3, 1, 0)
    sealed.zpages[sealed.starts[1] + HEADER_SIZE + 1] ^= 0xFF  # a payload byte of the second
    pages = cache.opened(sealed.open())
    assert pages[0] == sample_pages[0] and pages[2] is None
    assert isinstance(pages[1], CorruptPage)
    assert (cache.stats.hits, cache.stats.corrupt) == (1, 1)


def test_ephemeral_read_out_removes_at_once(sample_pages: list[bytes]) -> None:
    cache = ZCache()
    pool = cache.create_pool(E)
    cache.put(pool, 1, 0, sample_pages[0])
    sealed = cache.read_sealed(pool, [(1, 0)])
    assert cache.stored_pages == 0 and cache.frames == 0
    assert cache.opened(sealed.open()) == [sample_pages[0]]
