# tmem semantics of the engine, seen from its public interface: every refusal, every bad input,
# and what a get returns after each kind of put, flush and corruption.
from __future__ import annotations

import os

import pytest

from ramster.zcache import (
    PAGE_SIZE,
    CorruptPage,
    InvalidConfig,
    InvalidKey,
    InvalidPage,
    PoolKind,
    PutResult,
    UnknownPool,
    ZCache,
    ZCacheConfig,
)

P, E = PoolKind.PERSISTENT, PoolKind.EPHEMERAL


@pytest.fixture(params=["zbud", "zsmalloc"])
def allocator(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cache() -> ZCache:
    return ZCache(ZCacheConfig(pool_limit_frames=512))


def test_put_get_roundtrip_keeps_persistent_pages(
    cache: ZCache, allocator: str, compressible_pages: list[bytes]
) -> None:
    pool = cache.create_pool(P, allocator)
    for i, page in enumerate(compressible_pages):
        assert cache.put(pool, 7, i, page) is PutResult.STORED
    for _ in range(2):  # a persistent get does not remove
        for i, page in enumerate(compressible_pages):
            assert cache.get(pool, 7, i) == page
    assert cache.stored_pages == len(compressible_pages)
    cache.verify()


def test_exclusive_get_removes_persistent_page(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    cache.put(pool, 1, 2, sample_pages[0])
    assert cache.get(pool, 1, 2, exclusive=True) == sample_pages[0]
    assert cache.get(pool, 1, 2) is None
    assert cache.frames == 0


def test_ephemeral_get_removes_page(
    cache: ZCache, allocator: str, sample_pages: list[bytes]
) -> None:
    pool = cache.create_pool(E, allocator)
    cache.put(pool, 1, 2, sample_pages[3])
    assert cache.get(pool, 1, 2) == sample_pages[3]
    assert cache.get(pool, 1, 2) is None
    assert cache.stats.misses == 1 and cache.stats.hits == 1


def test_same_filled_pages_store_only_the_word(cache: ZCache) -> None:
    pool = cache.create_pool(P)
    zero = bytes(PAGE_SIZE)
    pattern = b"\xde\xad\xbe\xef\x01\x02\x03\x04" * (PAGE_SIZE // 8)
    assert cache.put(pool, 0, 0, zero) is PutResult.SAME_FILLED
    assert cache.put(pool, 0, 1, pattern) is PutResult.SAME_FILLED
    assert cache.put(pool, 0, 2, zero) is PutResult.SAME_FILLED
    assert cache.frames == 0
    assert cache.get(pool, 0, 0) == zero
    assert cache.get(pool, 0, 1) == pattern
    assert len(cache.same.words) == 2  # the two zero pages share one word


def test_same_filled_words_among_zpages_are_counted_in_and_out(
    cache: ZCache, allocator: str, sample_pages: list[bytes]
) -> None:
    """Batches mixing words and zpages (which zsmalloc files and frees natively, the words
    passed over to the cache): each word is referenced once per page and let go when its page
    is replaced or flushed."""
    pool = cache.create_pool(P, allocator)
    zero, ones = bytes(PAGE_SIZE), b"\xff" * PAGE_SIZE
    pages = [
        page for pair in zip(sample_pages[:30], [zero, ones] * 15, strict=True) for page in pair
    ]
    keys = [(1, i) for i in range(len(pages))]
    results = cache.put_batch(pool, keys, pages)
    assert results.count(PutResult.SAME_FILLED) == 30 and cache.same.pages == 30
    assert len(cache.same.words) == 2
    cache.put_batch(pool, keys[:20], sample_pages[30:50])  # 10 words replaced by zpages
    assert cache.same.pages == 20
    cache.put_batch(pool, keys[20:], [zero] * 40)  # 20 words and 20 zpages replaced by words
    assert cache.same.pages == 40
    assert cache.flush_pages(pool, keys[20:30]) == 10 and cache.same.pages == 30
    assert cache.get_batch(pool, keys) == [*sample_pages[30:50], *[None] * 10, *[zero] * 30]
    cache.put_batch(pool, keys, sample_pages[:60])
    assert cache.same.pages == 0 and not any(cache.same.words)
    cache.verify()


def test_a_pool_that_drops_zero_pages_keeps_none(
    cache: ZCache, allocator: str, sample_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    """A block device's pool: a page of zero bytes empties its key (the page it replaces goes)
    and reads as a miss; other same-filled pages are kept as words; other pools keep zeros."""
    pool, other = cache.create_pool(P, allocator, store_raw=True), cache.create_pool(P)
    cache.drop_zero_pages(pool)
    zero, ones = bytes(PAGE_SIZE), b"\xff" * PAGE_SIZE
    # zpages (filed natively, the words passed over), a raw page, then words the Python path files
    pages = [*sample_pages[:8], zero, ones, zero, incompressible_pages[0], zero, ones]
    keys = [(1, i) for i in range(len(pages))]
    assert cache.put_batch(pool, keys, [*sample_pages[:14]])[0] is PutResult.STORED
    results = cache.put_batch(pool, keys, pages)
    assert [results[i] for i in (8, 9, 10, 12, 13)] == [PutResult.SAME_FILLED] * 5
    got = cache.get_batch(pool, keys)
    assert got == [*sample_pages[:8], None, ones, None, incompressible_pages[0], None, ones]
    assert cache.pool_pages(pool) == len(pages) - 3 and cache.same.pages == 2
    assert cache.put(pool, 2, 0, zero) is PutResult.SAME_FILLED and cache.get(pool, 2, 0) is None
    cache.put(other, 1, 0, zero)
    assert cache.get(other, 1, 0) == zero
    cache.verify()


def test_poorly_compressible_page_is_refused_with_reason(
    cache: ZCache, incompressible_pages: list[bytes]
) -> None:
    pool = cache.create_pool(P)
    assert cache.put(pool, 0, 0, incompressible_pages[0]) is PutResult.REFUSED_POOR_COMPRESSION
    assert cache.snapshot().refused()["poor_compression"] == 1
    assert cache.get(pool, 0, 0) is None


def test_threshold_is_configurable(compressible_pages: list[bytes]) -> None:
    strict = ZCache(ZCacheConfig(pool_limit_frames=64, compress_threshold=64))
    pool = strict.create_pool(P)
    assert strict.put(pool, 0, 0, compressible_pages[0]) is PutResult.REFUSED_POOR_COMPRESSION


def test_store_raw_policy_keeps_incompressible_pages(
    allocator: str, incompressible_pages: list[bytes]
) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=64, store_incompressible_raw=True))
    pool = cache.create_pool(P, allocator)
    for i, page in enumerate(incompressible_pages):
        assert cache.put(pool, 0, i, page) is PutResult.STORED_RAW
    assert cache.frames == len(incompressible_pages)
    for i, page in enumerate(incompressible_pages):
        assert cache.get(pool, 0, i) == page
    cache.verify()


def test_runs_of_raw_pages_among_zpages_are_filed_and_replaced_page_for_page(
    allocator: str, incompressible_pages: list[bytes], compressible_pages: list[bytes]
) -> None:
    """A put batch's raw pages, alone, in runs, and between zpages and same-filled pages, are
    stored as the same pages put one by one, and so are the pages that replace them (a batch
    frees runs of raw pages as it frees zpages)."""
    raw, z, same = incompressible_pages, compressible_pages, bytes(4096)
    first = [raw[0], raw[1], raw[2], z[0], raw[3], z[1], z[2], same, raw[4], raw[5]]
    second = [z[3], raw[6], raw[7], raw[5], same, z[4], raw[1], z[5], z[6], raw[0]]
    config = ZCacheConfig(pool_limit_frames=256, store_incompressible_raw=True)
    batched, single = ZCache(config), ZCache(config)
    pools = [cache.create_pool(P, allocator) for cache in (batched, single)]
    for pages in (first, second):
        keys = [(0, i) for i in range(len(pages))]
        assert batched.put_batch(pools[0], keys, pages) == [
            single.put(pools[1], 0, i, page) for i, page in enumerate(pages)
        ]
        assert batched.get_batch(pools[0], keys) == pages
        assert (batched.frames, batched.stored_pages) == (single.frames, single.stored_pages)
        batched.verify()


def test_no_room_refusal(allocator: str, compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=2))
    pool = cache.create_pool(P, allocator)
    results = [cache.put(pool, 0, i, p) for i, p in enumerate(compressible_pages[:20])]
    assert PutResult.REFUSED_NO_ROOM in results
    assert cache.snapshot().refused()["no_room"] == results.count(PutResult.REFUSED_NO_ROOM)
    for i, result in enumerate(results):
        expected = None if result.refused else compressible_pages[i]
        assert cache.get(pool, 0, i) == expected
    cache.verify()


def test_duplicate_put_replaces(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    cache.put(pool, 0, 0, sample_pages[0])
    cache.put(pool, 0, 0, sample_pages[1])
    assert cache.get(pool, 0, 0) == sample_pages[1]
    assert cache.stored_pages == 1
    assert cache.stats.duplicate_puts == 1
    cache.verify()


def test_rejected_duplicate_put_drops_old_page(
    cache: ZCache, sample_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    pool = cache.create_pool(P)
    cache.put(pool, 0, 0, sample_pages[0])
    assert cache.put(pool, 0, 0, incompressible_pages[0]).refused
    assert cache.get(pool, 0, 0) is None  # never the stale page
    assert cache.frames == 0


def test_batch_with_repeated_key_keeps_last(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    cache.put_batch(pool, [(0, 0), (0, 0)], [sample_pages[0], sample_pages[1]])
    assert cache.get(pool, 0, 0) == sample_pages[1]
    assert cache.stored_pages == 1
    cache.verify()


def test_flush_page_and_object(cache: ZCache, allocator: str, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P, allocator)
    for oid in (1, 2):
        for i in range(10):
            cache.put(pool, oid, i * 1000, sample_pages[i])
    assert cache.flush_page(pool, 1, 0) is True
    assert cache.flush_page(pool, 1, 0) is False
    assert cache.get(pool, 1, 0) is None
    assert cache.flush_object(pool, 1) == 9
    assert cache.flush_object(pool, 1) == 0
    assert all(cache.get(pool, 2, i * 1000) == sample_pages[i] for i in range(10))
    cache.verify()


def test_flush_pages_frees_what_flush_page_frees(
    allocator: str, sample_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    """zpages, same-filled words and raw pages, some keys missing, one repeated."""
    pages = [*sample_pages[:40], bytes(PAGE_SIZE), b"\xab" * PAGE_SIZE, *incompressible_pages[:3]]
    caches = []
    for batch in (False, True):
        cache = ZCache(ZCacheConfig(pool_limit_frames=512))
        pool = cache.create_pool(P, allocator, store_raw=True)
        cache.put_batch(pool, [(4, i) for i in range(len(pages))], pages)
        gone = [(4, i) for i in range(0, len(pages) + 5, 2)] + [(4, 2), (5, 0)]
        if batch:
            assert cache.flush_pages(pool, gone) == (len(pages) + 1) // 2
        else:
            assert sum(cache.flush_page(pool, *key) for key in gone) == (len(pages) + 1) // 2
        assert [cache.get(pool, 4, i) for i in range(len(pages))] == [
            None if i % 2 == 0 else page for i, page in enumerate(pages)
        ]
        cache.verify()
        caches.append((cache, pool))
    (one, _), (many, pool) = caches
    assert (many.stored_pages, many.frames) == (one.stored_pages, one.frames)
    assert many.stats.flushes == one.stats.flushes
    assert many.flush_pages(pool, [(4, i) for i in range(len(pages))]) == len(pages) // 2
    assert (many.stored_pages, many.frames) == (0, 0)
    with pytest.raises(InvalidKey, match="object id"):
        many.flush_pages(pool, [(4, 0), (-1, 0)])


def test_destroy_pool_frees_frames(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P, "zbud")
    other = cache.create_pool(E, "zsmalloc")
    for i, page in enumerate(sample_pages[:40]):
        cache.put(pool, 0, i, page)
        cache.put(other, 0, i, page)
    assert cache.destroy_pool(pool) == 40
    with pytest.raises(UnknownPool):
        cache.get(pool, 0, 0)
    cache.destroy_pool(other)
    assert cache.frames == 0


@pytest.mark.parametrize(
    ("oid", "index", "what"),
    [
        (-1, 0, "object id"),
        (1 << 64, 0, "object id"),
        ("7", 0, "object id"),
        (0, -1, "page index"),
        (0, 1 << 32, "page index"),
        (0, 1.0, "page index"),
        (True, 0, "object id"),
    ],
)
def test_bad_keys_are_refused(cache: ZCache, oid: object, index: object, what: str) -> None:
    pool = cache.create_pool(P)
    page = bytes(PAGE_SIZE)
    for call in (
        lambda: cache.put(pool, oid, index, page),  # type: ignore[arg-type]
        lambda: cache.get(pool, oid, index),  # type: ignore[arg-type]
        lambda: cache.flush_page(pool, oid, index),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidKey, match=what):
            call()


def test_extreme_keys_are_accepted(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    key = ((1 << 64) - 1, (1 << 32) - 1)
    cache.put(pool, *key, sample_pages[5])
    assert cache.get(pool, *key) == sample_pages[5]


@pytest.mark.parametrize(
    ("page", "what"),
    [
        (b"x" * 4095, "exactly 4096 bytes, got 4095"),
        (b"x" * 4097, "exactly 4096 bytes, got 4097"),
        (b"", "got 0"),
        ("text" * 1024, "bytes-like"),
        (None, "bytes-like"),
    ],
)
def test_bad_pages_are_refused(cache: ZCache, page: object, what: str) -> None:
    pool = cache.create_pool(P)
    with pytest.raises(InvalidPage, match=what):
        cache.put(pool, 0, 0, page)  # type: ignore[arg-type]
    assert cache.stats.puts == 0


def test_bytes_like_pages_are_accepted(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    cache.put(pool, 0, 0, bytearray(sample_pages[0]))  # type: ignore[arg-type]
    cache.put(pool, 0, 1, memoryview(sample_pages[1]))  # type: ignore[arg-type]
    assert cache.get(pool, 0, 0) == sample_pages[0]
    assert cache.get(pool, 0, 1) == sample_pages[1]


def test_bad_batch_changes_nothing(cache: ZCache, sample_pages: list[bytes]) -> None:
    pool = cache.create_pool(P)
    with pytest.raises(InvalidPage):
        cache.put_batch(pool, [(0, 0), (0, 1)], [sample_pages[0], b"short"])
    with pytest.raises(InvalidKey):
        cache.put_batch(pool, [(0, 0), (0, -1)], sample_pages[:2])
    with pytest.raises(InvalidPage, match="2 keys but 1 pages"):
        cache.put_batch(pool, [(0, 0), (0, 1)], sample_pages[:1])
    assert cache.stored_pages == 0


def test_unknown_pool(cache: ZCache) -> None:
    with pytest.raises(UnknownPool, match="no pool with id 99"):
        cache.put(99, 0, 0, bytes(PAGE_SIZE))
    with pytest.raises(UnknownPool):
        cache.destroy_pool(99)


def test_bad_config_and_allocator() -> None:
    with pytest.raises(InvalidConfig, match="compress_threshold"):
        ZCacheConfig(compress_threshold=PAGE_SIZE)
    with pytest.raises(InvalidConfig, match="pool_limit_frames"):
        ZCacheConfig(pool_limit_frames=-5)
    with pytest.raises(InvalidConfig, match="unknown allocator"):
        ZCacheConfig(default_allocator="slab")
    with pytest.raises(InvalidConfig, match="unknown allocator"):
        ZCache(ZCacheConfig(pool_limit_frames=8)).create_pool(P, "slab")


def _corrupt(cache: ZCache, pool: int, oid: int, index: int, offset: int) -> None:
    """Flip one byte of the zpage stored under a key, `offset` bytes into it."""
    p = cache.pool(pool)
    handle = p.index.get(oid, index)
    alloc = p.allocator_of(handle)
    extents = dict(alloc.extents())[handle & ((1 << 56) - 1)]
    for frame, start, end in extents:  # the zpage's bytes in the arena, in order
        if offset < end - start:
            cache.arena.view[frame * 4096 + start + offset] ^= 0xFF
            return
        offset -= end - start
    raise AssertionError("offset past the zpage's slot")


@pytest.mark.parametrize("offset", [0, 4, 6, 10, 18, 100])  # sum, length, index, oid, payload
def test_corruption_is_detected_never_returned(
    cache: ZCache, allocator: str, sample_pages: list[bytes], offset: int
) -> None:
    pool = cache.create_pool(P, allocator)
    cache.put(pool, 3, 4, sample_pages[0])
    cache.put(pool, 3, 5, sample_pages[1])
    _corrupt(cache, pool, 3, 4, offset)
    with pytest.raises(CorruptPage):
        cache.get(pool, 3, 4)
    got = cache.get_batch(pool, [(3, 4), (3, 5)])
    assert isinstance(got[0], CorruptPage)
    assert got[1] == sample_pages[1]
    assert cache.stats.corrupt == 2


def test_compact_frees_frames_and_keeps_pages(compressible_pages: list[bytes]) -> None:
    cache = ZCache(ZCacheConfig(pool_limit_frames=4096))
    pool = cache.create_pool(P, "zsmalloc")
    keys = [(0, i) for i in range(2000)]
    pages = [compressible_pages[i % len(compressible_pages)] for i in range(2000)]
    cache.put_batch(pool, keys, pages)
    for i in range(0, 2000, 3):  # leave every zspage partly empty
        cache.flush_page(pool, 0, i)
        cache.flush_page(pool, 0, i + 1)
    before = cache.frames
    freed = cache.compact()
    assert freed > 0 and cache.frames == before - freed
    cache.verify()
    for i in range(2, 2000, 3):
        assert cache.get(pool, 0, i) == pages[i]


def test_random_pages_never_come_back_wrong(cache: ZCache, allocator: str) -> None:
    pool = cache.create_pool(P, allocator)
    page = os.urandom(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2)  # compresses to about half
    assert cache.put(pool, 0, 0, page) is PutResult.STORED
    assert cache.get(pool, 0, 0) == page


def test_pools_are_created_under_given_ids(cache: ZCache) -> None:
    assert cache.next_pool_id == 0
    assert cache.create_pool(P, "zbud", pool_id=7) == 7
    assert cache.next_pool_id == 8
    assert cache.create_pool(E) == 8
    assert cache.create_pool(P, pool_id=3) == 3
    assert cache.create_pool(P) == 9, "auto ids continue above the highest id ever used"
    cache.destroy_pool(9)
    assert cache.next_pool_id == 10
    with pytest.raises(InvalidConfig, match="pool id 7 is taken"):
        cache.create_pool(E, pool_id=7)
    for bad in (-1, 1 << 32, "4", 2.0, True):
        with pytest.raises(InvalidConfig, match="pool id must be"):
            cache.create_pool(P, pool_id=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfig, match="store_raw"):
        cache.create_pool(P, store_raw="yes")  # type: ignore[arg-type]
    pool = cache.pool(7)
    assert (pool.id, pool.kind, pool.allocator, pool.store_raw) == (7, P, "zbud", False)
    assert sorted(cache.pools) == [3, 7, 8]


def test_store_raw_is_a_per_pool_choice(incompressible_pages: list[bytes]) -> None:
    page = incompressible_pages[0]
    for default in (False, True):
        cache = ZCache(ZCacheConfig(pool_limit_frames=16, store_incompressible_raw=default))
        inherit, raw, strict = (cache.create_pool(P, store_raw=s) for s in (None, True, False))
        assert cache.pool(inherit).store_raw is default
        assert cache.put(raw, 0, 0, page) is PutResult.STORED_RAW
        assert cache.put(strict, 0, 0, page) is PutResult.REFUSED_POOR_COMPRESSION
        assert cache.put(inherit, 0, 0, page).refused is not default
        assert cache.get(raw, 0, 0) == page
        cache.verify()


def test_pools_given_at_start_are_recreated() -> None:
    specs = [(4, E, "zbud", None), (11, P, "zsmalloc", True)]
    started = ZCache(ZCacheConfig(pool_limit_frames=8), pools=specs)
    got = [(p.id, p.kind, p.allocator, p.store_raw) for p in started.pools.values()]
    assert got == [(4, E, "zbud", False), (11, P, "zsmalloc", True)]
    assert started.next_pool_id == 12
