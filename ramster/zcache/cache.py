# ZCache: tmem semantics over the codec, the allocators and the pageframe arena.
#
# The index of each pool maps a key to one 64-bit handle whose top byte says where the page is:
#
#     ZPAGE  in the pool's allocator (zbud or zsmalloc), compressed, with its 18-byte header
#     RAW    in a frame of its own, uncompressed (store-raw policy for incompressible pages)
#     SAME   only its repeated 8-byte word, in the shared same-filled table
#
# A put validates, drops any old page under the key (a rejected duplicate put never leaves stale
# data behind), checks for a same-filled page, compresses, passes the bouncer (poor compression,
# no room) and files the handle.  Refusals are counted per reason and returned, not raised.  A get
# verifies the zpage's checksum and key before decompressing, so corruption surfaces as
# CorruptPage and never as wrong bytes.  Ephemeral pools (cleancache) lose a page on get; persistent
# pools (frontswap) keep it unless the get is exclusive.  Every put and get stamps the unit holding
# the zpage with a global tick, which is the recency the reaper reads.
#
# The engine is synchronous and single-threaded: callers serialise access (the node does so on
# its event loop), which keeps every structure lock-free.
from __future__ import annotations

from dataclasses import dataclass, field

from ramster.zcache.allocator import Allocator
from ramster.zcache.arena import Arena
from ramster.zcache.codec import (
    PAGE_SIZE,
    compress,
    make_zpage,
    open_zpage,
    same_filled_word,
    zpage_key,
)
from ramster.zcache.config import (
    REFUSALS,
    PoolKind,
    PutResult,
    ZCacheConfig,
)
from ramster.zcache.errors import (
    CorruptPage,
    InvalidKey,
    InvalidPage,
    UnknownPool,
    ZCacheError,
)
from ramster.zcache.index import PageIndex
from ramster.zcache.rawframes import RawFrames
from ramster.zcache.samefill import SameFilledWords
from ramster.zcache.zbud import Zbud
from ramster.zcache.zsmalloc import Zsmalloc

MAX_OID = (1 << 64) - 1
MAX_INDEX = (1 << 32) - 1
KIND_SHIFT = 56
HANDLE_MASK = (1 << KIND_SHIFT) - 1
ZPAGE = 1
RAW = 2
SAME = 3
ZPAGE_TAG = ZPAGE << KIND_SHIFT
RAW_TAG = RAW << KIND_SHIFT
SAME_TAG = SAME << KIND_SHIFT


class InvariantViolation(ZCacheError):
    """verify() found the engine's structures inconsistent (a bug, never user error)."""


@dataclass
class Stats:
    puts: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    stored: int = 0
    same_filled: int = 0
    stored_raw: int = 0
    duplicate_puts: int = 0
    flushes: int = 0
    corrupt: int = 0
    compacted_frames: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {r.reason: 0 for r in REFUSALS})


class Pool:
    """One tmem pool: its kind, its zpage allocator, its raw frames and its index."""

    def __init__(self, pool_id: int, kind: PoolKind, allocator: Allocator, raw: RawFrames) -> None:
        self.id = pool_id
        self.kind = kind
        self.ephemeral = kind is PoolKind.EPHEMERAL
        self.zalloc = allocator
        self.raw = raw
        self.index = PageIndex()

    def allocator_of(self, handle: int) -> Allocator:
        return self.zalloc if handle >> KIND_SHIFT == ZPAGE else self.raw


def check_key(oid: object, index: object) -> None:
    if type(oid) is not int or not 0 <= oid <= MAX_OID:
        raise InvalidKey(f"object id must be an integer in [0, 2**64), got {oid!r}")
    if type(index) is not int or not 0 <= index <= MAX_INDEX:
        raise InvalidKey(f"page index must be an integer in [0, 2**32), got {index!r}")


def as_page(page: object) -> bytes:
    """`page` as bytes, if it is a bytes-like object of exactly PAGE_SIZE bytes."""
    if type(page) is not bytes:
        try:
            page = bytes(memoryview(page))  # type: ignore[arg-type]
        except TypeError:
            raise InvalidPage(
                f"a page must be a bytes-like object, got {type(page).__name__}"
            ) from None
    if len(page) != PAGE_SIZE:
        raise InvalidPage(f"a page must be exactly {PAGE_SIZE} bytes, got {len(page)}")
    return page


class ZCache:
    def __init__(self, config: ZCacheConfig | None = None) -> None:
        self.config = config or ZCacheConfig()
        self.arena = Arena(self.config.capacity_frames)
        self.pools: dict[int, Pool] = {}
        self.same = SameFilledWords()
        self.stats = Stats()
        self.tick = 0
        self._next_pool_id = 0
        self._threshold = self.config.compress_threshold
        self._store_raw = self.config.store_incompressible_raw

    # -- pools ------------------------------------------------------------------------------
    def create_pool(self, kind: PoolKind, allocator: str | None = None) -> int:
        name = allocator or self.config.default_allocator
        zalloc: Allocator
        if name == "zbud":
            zalloc = Zbud(self.arena)
        elif name == "zsmalloc":
            zalloc = Zsmalloc(self.arena)
        else:
            raise InvalidPage(f"unknown allocator {name!r}; choose zbud or zsmalloc")
        pool_id = self._next_pool_id
        self._next_pool_id += 1
        self.pools[pool_id] = Pool(pool_id, PoolKind(kind), zalloc, RawFrames(self.arena))
        return pool_id

    def pool(self, pool_id: int) -> Pool:
        try:
            return self.pools[pool_id]
        except (KeyError, TypeError):
            raise UnknownPool(f"no pool with id {pool_id!r}") from None

    def destroy_pool(self, pool_id: int) -> int:
        """Drop a pool and every page in it; the number of pages dropped."""
        pool = self.pool(pool_id)
        count = 0
        for _, _, handle in list(pool.index.items()):
            self._release(pool, handle)
            count += 1
        del self.pools[pool_id]
        return count

    # -- tmem operations --------------------------------------------------------------------
    def put(self, pool_id: int, oid: int, index: int, page: bytes) -> PutResult:
        pool = self.pool(pool_id)
        check_key(oid, index)
        if type(page) is not bytes or len(page) != PAGE_SIZE:
            page = as_page(page)
        stats = self.stats
        stats.puts += 1
        old = pool.index.pop(oid, index)
        if old:
            self._release(pool, old)
            stats.duplicate_puts += 1
        word = same_filled_word(page)
        if word is not None:
            pool.index.set(oid, index, SAME_TAG | self.same.ref(word))
            stats.same_filled += 1
            return PutResult.SAME_FILLED
        payload = compress(page)
        alloc: Allocator
        if len(payload) <= self._threshold:
            alloc, tag, result = pool.zalloc, ZPAGE_TAG, PutResult.STORED
        elif self._store_raw:
            alloc, tag, result, payload = pool.raw, RAW_TAG, PutResult.STORED_RAW, page
        else:
            return self._refuse(PutResult.REFUSED_POOR_COMPRESSION)
        self.tick += 1
        handle = alloc.alloc(make_zpage(oid, index, payload), self.tick)
        if handle < 0:
            return self._refuse(PutResult.REFUSED_NO_ROOM)
        pool.index.set(oid, index, tag | handle)
        if tag == ZPAGE_TAG:
            stats.stored += 1
        else:
            stats.stored_raw += 1
        return result

    def get(self, pool_id: int, oid: int, index: int, exclusive: bool = False) -> bytes | None:
        """The page under a key, or None.  Ephemeral pools and exclusive gets remove it."""
        pool = self.pool(pool_id)
        check_key(oid, index)
        self.stats.gets += 1
        remove = exclusive or pool.ephemeral
        handle = pool.index.pop(oid, index) if remove else pool.index.get(oid, index)
        if not handle:
            self.stats.misses += 1
            return None
        try:
            page = self._load(pool, oid, index, handle, touch=not remove)
        except CorruptPage:
            self.stats.corrupt += 1
            raise
        finally:
            if remove:
                self._release(pool, handle)
        self.stats.hits += 1
        return page

    def flush_page(self, pool_id: int, oid: int, index: int) -> bool:
        """Forget the page under a key; whether there was one."""
        pool = self.pool(pool_id)
        check_key(oid, index)
        handle = pool.index.pop(oid, index)
        if handle:
            self._release(pool, handle)
            self.stats.flushes += 1
        return bool(handle)

    def flush_object(self, pool_id: int, oid: int) -> int:
        """Forget every page of an object; how many there were."""
        pool = self.pool(pool_id)
        check_key(oid, 0)
        found = pool.index.pop_object(oid)
        for _, handle in found:
            self._release(pool, handle)
        self.stats.flushes += len(found)
        return len(found)

    def compact(self) -> int:
        """Move zpages to give back whole frames; the number of frames freed."""
        freed = 0
        for pool in self.pools.values():

            def moved(old: int, new: int, zpage: bytes, pool: Pool = pool) -> None:
                oid, index = zpage_key(zpage)
                if pool.index.get(oid, index) != ZPAGE_TAG | old:
                    raise InvariantViolation(f"moved zpage {old:#x} is not filed under its key")
                pool.index.replace(oid, index, ZPAGE_TAG | new)

            freed += pool.zalloc.compact(moved)
        self.stats.compacted_frames += freed
        return freed

    # -- internals --------------------------------------------------------------------------
    def _refuse(self, result: PutResult) -> PutResult:
        self.stats.refused[result.reason] += 1
        return result

    def _load(self, pool: Pool, oid: int, index: int, handle: int, touch: bool) -> bytes:
        kind = handle >> KIND_SHIFT
        handle &= HANDLE_MASK
        if kind == SAME:
            return self.same.page(handle)
        alloc = pool.zalloc if kind == ZPAGE else pool.raw
        if touch:
            self.tick += 1
            alloc.touch(handle, self.tick)
        return open_zpage(alloc.read(handle), oid, index)

    def _release(self, pool: Pool, handle: int) -> None:
        kind = handle >> KIND_SHIFT
        if kind == SAME:
            self.same.unref(handle & HANDLE_MASK)
        else:
            pool.allocator_of(handle).free(handle & HANDLE_MASK)

    # -- introspection ----------------------------------------------------------------------
    @property
    def frames(self) -> int:
        return self.arena.in_use

    @property
    def zpages_in_frames(self) -> int:
        return sum(p.zalloc.zpages + p.raw.zpages for p in self.pools.values())

    @property
    def stored_pages(self) -> int:
        return sum(p.index.count for p in self.pools.values())

    def pages_per_frame(self) -> float:
        return self.zpages_in_frames / self.frames if self.frames else 0.0

    def metadata_bytes(self) -> int:
        """Bytes of Python-side bookkeeping (index, allocator arrays, lists), frames excluded."""
        total = self.arena.metadata_bytes() + self.same.metadata_bytes()
        for p in self.pools.values():
            total += p.index.metadata_bytes() + p.zalloc.metadata_bytes() + p.raw.metadata_bytes()
        return total

    def verify(self) -> None:
        """Check every structural invariant; raise InvariantViolation on the first broken one."""
        frames: set[int] = set()
        for pool in self.pools.values():
            for tag, alloc in ((ZPAGE_TAG, pool.zalloc), (RAW_TAG, pool.raw)):
                owned = alloc.owned_frames()
                if len(owned) != alloc.frames or owned & frames:
                    raise InvariantViolation(f"{alloc.name} frame accounting is inconsistent")
                frames |= owned
                spans: dict[int, list[tuple[int, int]]] = {}
                live = 0
                for handle, extents in alloc.extents():
                    live += 1
                    for frame, start, end in extents:
                        if frame not in owned or not 0 <= start < end <= PAGE_SIZE:
                            raise InvariantViolation(f"zpage {handle:#x} lies outside its frames")
                        spans.setdefault(frame, []).append((start, end))
                    oid, index = zpage_key(alloc.read(handle))
                    if pool.index.get(oid, index) != tag | handle:
                        raise InvariantViolation(f"zpage {handle:#x} is not filed under its key")
                if live != alloc.zpages:
                    raise InvariantViolation(f"{alloc.name} counts {alloc.zpages}, holds {live}")
                for frame, ranges in spans.items():
                    ranges.sort()
                    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
                        if start < end:
                            raise InvariantViolation(f"zpages overlap in frame {frame}")
            same = sum(1 for *_, h in pool.index.items() if h >> KIND_SHIFT == SAME)
            if pool.index.count != pool.zalloc.zpages + pool.raw.zpages + same:
                raise InvariantViolation(f"pool {pool.id} index count disagrees with its zpages")
        if len(frames) != self.arena.in_use:
            raise InvariantViolation(
                f"arena has {self.arena.in_use} frames in use, allocators own {len(frames)}"
            )

    def close(self) -> None:
        self.pools.clear()
        self.arena.close()
