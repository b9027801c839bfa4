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
from itertools import pairwise

from ramster.zcache.allocator import Allocator
from ramster.zcache.arena import Arena
from ramster.zcache.codec import PAGE_SIZE, compress, make_zpage, open_zpage, zpage_key
from ramster.zcache.config import ALLOCATORS, PoolKind, PutResult, ZCacheConfig
from ramster.zcache.errors import (
    CorruptPage,
    InvalidConfig,
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
    """Plain counters; the node's metrics read them."""

    puts: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    duplicate_puts: int = 0
    flushes: int = 0
    corrupt: int = 0
    compacted_frames: int = 0
    outcomes: dict[PutResult, int] = field(default_factory=lambda: dict.fromkeys(PutResult, 0))

    @property
    def refused(self) -> dict[str, int]:
        """Refused puts by reason."""
        return {r.reason: n for r, n in self.outcomes.items() if r.refused}


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


def check_keys(keys: list[tuple[int, int]]) -> None:
    try:
        for oid, index in keys:
            if not (type(oid) is int and 0 <= oid <= MAX_OID) or not (
                type(index) is int and 0 <= index <= MAX_INDEX
            ):
                check_key(oid, index)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidKey):
            raise
        raise InvalidKey(f"a key must be an (object id, page index) pair: {exc}") from None


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
            raise InvalidConfig(f"unknown allocator {name!r}; choose one of {ALLOCATORS}")
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
        """Store one page; what became of it (stored, same-filled, raw, or refused and why)."""
        return self.put_batch(pool_id, [(oid, index)], [page])[0]

    def get(self, pool_id: int, oid: int, index: int, exclusive: bool = False) -> bytes | None:
        """The page under a key, or None.  Ephemeral pools and exclusive gets remove it."""
        page = self.get_batch(pool_id, [(oid, index)], exclusive)[0]
        if isinstance(page, CorruptPage):
            raise page
        return page

    def put_batch(
        self, pool_id: int, keys: list[tuple[int, int]], pages: list[bytes]
    ) -> list[PutResult]:
        """Store many pages of one pool; one result per page.  Input is checked before any
        page is stored, so a bad key or page refuses the whole batch with nothing changed."""
        pool = self.pool(pool_id)
        if len(keys) != len(pages):
            raise InvalidPage(f"{len(keys)} keys but {len(pages)} pages")
        check_keys(keys)
        pages = [p if type(p) is bytes and len(p) == PAGE_SIZE else as_page(p) for p in pages]
        stats = self.stats
        stats.puts += len(keys)
        for old in pool.index.pop_many(keys):
            if old:
                self._release(pool, old)
                stats.duplicate_puts += 1
        results = []
        handles = []
        same = self.same
        zalloc = pool.zalloc
        threshold = self._threshold
        for (oid, index), page in zip(keys, pages, strict=True):
            word = page[:8]
            if page == word * 512:
                handles.append(SAME_TAG | same.ref(word))
                results.append(PutResult.SAME_FILLED)
                continue
            payload = compress(page)
            if len(payload) <= threshold:
                self.tick += 1
                handle = zalloc.alloc(make_zpage(oid, index, payload), self.tick)
                if handle >= 0:
                    handles.append(ZPAGE_TAG | handle)
                    results.append(PutResult.STORED)
                    continue
                result = PutResult.REFUSED_NO_ROOM
            elif self._store_raw:
                self.tick += 1
                handle = pool.raw.alloc(make_zpage(oid, index, page), self.tick)
                if handle >= 0:
                    handles.append(RAW_TAG | handle)
                    results.append(PutResult.STORED_RAW)
                    continue
                result = PutResult.REFUSED_NO_ROOM
            else:
                result = PutResult.REFUSED_POOR_COMPRESSION
            handles.append(0)
            results.append(result)
        for displaced in pool.index.set_many(keys, handles):
            self._release(pool, displaced)
        for result in results:
            stats.outcomes[result] += 1
        return results

    def get_batch(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> list[bytes | CorruptPage | None]:
        """Pages under many keys of one pool: bytes on a hit, None on a miss, and a CorruptPage
        (not raised) for a page that failed verification, so one bad page spoils no others."""
        pool = self.pool(pool_id)
        check_keys(keys)
        remove = exclusive or pool.ephemeral
        handles = pool.index.pop_many(keys) if remove else pool.index.get_many(keys)
        zalloc = pool.zalloc
        zread, zticks, zshift = zalloc.read, zalloc.lru.tick, zalloc.unit_shift
        tick = self.tick
        out: list[bytes | CorruptPage | None] = []
        for (oid, index), handle in zip(keys, handles, strict=True):
            if not handle:
                out.append(None)
                continue
            kind = handle >> KIND_SHIFT
            h = handle & HANDLE_MASK
            try:
                if kind == ZPAGE:
                    if not remove:
                        tick += 1
                        zticks[h >> zshift] = tick
                    out.append(open_zpage(zread(h), oid, index))
                elif kind == SAME:
                    out.append(self.same.page(h))
                else:
                    tick += 1
                    pool.raw.lru.tick[h] = tick
                    out.append(open_zpage(pool.raw.read(h), oid, index))
            except CorruptPage as exc:
                out.append(exc)
            if remove:
                self._release(pool, handle)
        self.tick = tick
        stats = self.stats
        stats.gets += len(keys)
        misses = handles.count(0)
        stats.misses += misses
        corrupt = sum(1 for page in out if isinstance(page, CorruptPage))
        stats.corrupt += corrupt
        stats.hits += len(keys) - misses - corrupt
        return out

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

            def moved(old: int, new: int, zpage: bytes | memoryview, pool: Pool = pool) -> None:
                oid, index = zpage_key(zpage)
                if pool.index.get(oid, index) != ZPAGE_TAG | old:
                    raise InvariantViolation(f"moved zpage {old:#x} is not filed under its key")
                pool.index.replace(oid, index, ZPAGE_TAG | new)

            freed += pool.zalloc.compact(moved)
        self.stats.compacted_frames += freed
        return freed

    # -- internals --------------------------------------------------------------------------
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
                    for (_, end), (start, _) in pairwise(ranges):
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
