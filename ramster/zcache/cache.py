# ZCache: tmem semantics over the codec, the allocators, the pageframe arena and the reaper.
#
# The index of each pool maps a key to one 64-bit handle that says where the page is (in an
# allocator, raw in a frame, as a same-filled word, or with the evictor: see handles.py).
#
# A put validates, drops any old page under the key (a rejected duplicate put never leaves stale
# data behind), checks for a same-filled page, compresses, passes the bouncer (poor compression,
# no room) and files the handle.  Refusals are counted per reason and returned, not raised.  When
# an allocation hits the pool limit the reaper frees frames down to the low mark and the put is
# retried once; only then is it refused for no room.  A get verifies the zpage's checksum and key
# before decompressing, wherever the zpage came from (RAM, disk, a peer), so corruption surfaces
# as CorruptPage and never as wrong bytes.  A non-exclusive get of an evicted persistent page
# brings it back to RAM (as an LRU cache would), still compressed.  Ephemeral pools (cleancache)
# lose a page on get; persistent pools (frontswap) keep it unless the get is exclusive.
#
# Batches are the core paths (single put/get wrap them): per-page Python overhead is what limits
# an engine whose budget is a small multiple of one LZ4 call.  The index of a put batch is written
# after its pages are stored; before any reclaim the part stored so far is filed, because the
# reaper finds a zpage's key in its header and checks it against the index.
#
# Each batch path is also offered in halves, so a caller can run the costly half elsewhere: a put
# batch is encoded (same-filled check, LZ4, zpage framing: PageEncoder, pure) and then filed
# (file_encoded); a get batch is read out (read_sealed: index, LRU, copies of the zpages) and then
# opened (SealedPages.open: verify, decompress, pure).  The pure halves read only their own
# inputs, so they may run in worker threads while the engine keeps serving; put_batch and
# get_batch are the two halves run back to back.  The price is a copy of each zpage a get reads
# (the frame may be reused before the copy is opened) and one more list per batch.
#
# Pools can be created under a given id (a node restoring its pool registry, before the evictor's
# recovered pages are filed), and each pool may override the engine's store-raw policy (a block
# device's pool must never refuse a page for poor compression).
#
# The engine is synchronous and single-threaded: callers serialise access (the node does so on
# its event loop), which keeps every structure lock-free; only the pure halves above may run on
# other threads.
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from ramster.zcache.allocator import Allocator
from ramster.zcache.arena import Arena
from ramster.zcache.codec import (
    HEADER_SIZE,
    PAGE_SIZE,
    WORD,
    compress,
    make_zpage,
    open_zpage,
    zpage_bytes,
    zpage_key,
    zpage_length,
)
from ramster.zcache.config import ALLOCATORS, PoolKind, PutResult, ZCacheConfig
from ramster.zcache.errors import (
    CorruptPage,
    InvalidConfig,
    InvalidKey,
    InvalidPage,
    PageError,
    PageUnavailable,
    UnknownPool,
    ZCacheError,
)
from ramster.zcache.evictor import Evictor
from ramster.zcache.handles import (
    EVICTED,
    EVICTED_TAG,
    HANDLE_MASK,
    KIND_SHIFT,
    RAW_TAG,
    SAME,
    SAME_TAG,
    ZPAGE,
    ZPAGE_TAG,
)
from ramster.zcache.index import PageIndex
from ramster.zcache.rawframes import RAW_ZPAGE, RawFrames
from ramster.zcache.reaper import Reaper
from ramster.zcache.samefill import SameFilledWords
from ramster.zcache.zbud import Zbud
from ramster.zcache.zsmalloc import Zsmalloc

MAX_OID = (1 << 64) - 1
MAX_INDEX = (1 << 32) - 1
MAX_POOL_ID = (1 << 32) - 1  # the backing file records pool ids in 32 bits
# A pool to recreate at start: (pool id, kind, allocator, store_raw or None for the default).
PoolSpec = tuple[int, PoolKind, str, bool | None]


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
    unavailable: int = 0  # gets of pages whose every copy was out of reach
    evicted_hits: int = 0  # gets served by the evictor (a miss in RAM)
    promoted: int = 0  # evicted pages brought back to RAM by a get
    compacted_frames: int = 0
    outcomes: dict[PutResult, int] = field(default_factory=lambda: dict.fromkeys(PutResult, 0))

    @property
    def refused(self) -> dict[str, int]:
        """Refused puts by reason."""
        return {r.reason: n for r, n in self.outcomes.items() if r.refused}


class Pool:
    """One tmem pool: its kind, its zpage allocator, its raw frames and its index."""

    def __init__(
        self, pool_id: int, kind: PoolKind, allocator: Allocator, raw: RawFrames, store_raw: bool
    ) -> None:
        self.id = pool_id
        self.kind = kind
        self.ephemeral = kind is PoolKind.EPHEMERAL
        self.store_raw = store_raw  # incompressible pages are stored raw, not refused
        self.allocator = allocator.name
        self.zalloc = allocator
        self.raw = raw
        self.index = PageIndex()
        self.evicted = 0  # pages of this pool held by the evictor

    def allocator_of(self, handle: int) -> Allocator:
        return self.zalloc if handle >> KIND_SHIFT == ZPAGE else self.raw

    def tag_of(self, alloc: Allocator) -> int:
        return ZPAGE_TAG if alloc is self.zalloc else RAW_TAG


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


def check_put_batch(keys: list[tuple[int, int]], pages: list[bytes]) -> list[bytes]:
    """The pages of a put batch as bytes, once every key and page has been checked."""
    if len(keys) != len(pages):
        raise InvalidPage(f"{len(keys)} keys but {len(pages)} pages")
    check_keys(keys)
    return [p if type(p) is bytes and len(p) == PAGE_SIZE else as_page(p) for p in pages]


@dataclass(frozen=True, slots=True)
class PageEncoder:
    """The part of a put that needs no engine state: same-filled check, LZ4, zpage framing.
    It reads nothing but its arguments and this copy of a pool's policy, so encode() may run
    on any thread (LZ4 releases the GIL) while the engine serves other calls."""

    threshold: int  # largest payload stored compressed
    store_raw: bool  # a page that compresses worse is stored raw (else refused)

    def encode(self, keys: list[tuple[int, int]], pages: list[bytes]) -> list[bytes | None]:
        """Per checked page: its word if it is same-filled (WORD bytes), its zpage (compressed,
        or raw under store_raw), or None (refused for poor compression)."""
        threshold, store_raw = self.threshold, self.store_raw
        out: list[bytes | None] = []
        for (oid, index), page in zip(keys, pages, strict=True):
            word = page[:WORD]
            if page[-WORD:] == word and page[2048:2056] == word and page == word * 512:
                out.append(word)
                continue
            payload = compress(page)
            if len(payload) <= threshold:
                out.append(make_zpage(oid, index, payload))
            else:
                out.append(make_zpage(oid, index, page) if store_raw else None)
        return out


@dataclass(slots=True)
class SealedPages:
    """A get batch read out of the engine (ZCache.read_sealed): `pages` holds each key's answer
    except at the positions `at`, whose zpage copies wait for open() to verify and decompress
    them.  open() touches nothing but this object, so it may run on any thread."""

    keys: list[tuple[int, int]]
    pages: list[bytes | PageError | None]
    at: list[int] = field(default_factory=list)
    zpages: list[bytes] = field(default_factory=list)
    opened: int = 0
    corrupt: int = 0

    def open(self) -> SealedPages:
        keys, pages = self.keys, self.pages
        for i, zpage in zip(self.at, self.zpages, strict=True):
            oid, index = keys[i]
            try:
                pages[i] = open_zpage(zpage, oid, index)
            except CorruptPage as exc:
                pages[i] = exc
                self.corrupt += 1
        self.opened += len(self.at)
        self.at, self.zpages = [], []
        return self


class ZCache:
    def __init__(
        self,
        config: ZCacheConfig | None = None,
        evictor: Evictor | None = None,
        pools: Iterable[PoolSpec] = (),
    ) -> None:
        """An engine whose `pools` are recreated under their ids, and which then files the pages
        `evictor` recovered from before a restart (in a pool of its own if `pools` lacks it)."""
        self.config = config or ZCacheConfig()
        self.arena = Arena(self.config.capacity_frames)
        self.evictor = evictor
        self.reaper = Reaper(self)
        self.pools: dict[int, Pool] = {}
        self.same = SameFilledWords()
        self.stats = Stats()
        self.tick = 0
        self._next_pool_id = 0
        self._threshold = self.config.compress_threshold
        self._low_mark = int(self.config.capacity_frames * self.config.reclaim_to)
        for pool_id, kind, allocator, store_raw in pools:
            self.create_pool(kind, allocator, pool_id=pool_id, store_raw=store_raw)
        if evictor is not None:
            self._adopt(evictor)

    def _adopt(self, evictor: Evictor) -> None:
        """File the pages an evictor kept from before a restart, recreating their pools."""
        for pool_id, allocator, oid, index, location in evictor.recovered():
            if pool_id not in self.pools:
                self.create_pool(PoolKind.PERSISTENT, allocator, pool_id=pool_id)
            pool = self.pools[pool_id]
            for displaced in pool.index.set_many([(oid, index)], [EVICTED_TAG | location]):
                self._release(pool, displaced)
            pool.evicted += 1

    # -- pools ------------------------------------------------------------------------------
    def create_pool(
        self,
        kind: PoolKind,
        allocator: str | None = None,
        *,
        pool_id: int | None = None,
        store_raw: bool | None = None,
    ) -> int:
        """A new empty pool; its id.  `pool_id` restores a pool under a known id (it must be
        free); `store_raw` overrides the engine's store_incompressible_raw for this pool."""
        kind = PoolKind(kind)
        name = allocator or self.config.default_allocator
        if name not in ALLOCATORS:
            raise InvalidConfig(f"unknown allocator {name!r}; choose one of {ALLOCATORS}")
        if pool_id is None:
            pool_id = self._next_pool_id
        if type(pool_id) is not int or not 0 <= pool_id <= MAX_POOL_ID:
            raise InvalidConfig(f"a pool id must be an integer in [0, 2**32), got {pool_id!r}")
        if pool_id in self.pools:
            taken = self.pools[pool_id].kind.value
            raise InvalidConfig(f"pool id {pool_id} is taken (by a {taken} pool)")
        if store_raw is None:
            store_raw = self.config.store_incompressible_raw
        elif type(store_raw) is not bool:
            raise InvalidConfig(f"store_raw must be True, False or None, got {store_raw!r}")
        zalloc: Allocator = Zbud(self.arena) if name == "zbud" else Zsmalloc(self.arena)
        pool = self.pools[pool_id] = Pool(pool_id, kind, zalloc, RawFrames(self.arena), store_raw)
        self.reaper.watch(pool)
        self._next_pool_id = max(self._next_pool_id, pool_id + 1)
        return pool_id

    @property
    def next_pool_id(self) -> int:
        """The id the next create_pool without `pool_id` will use (above every id ever used)."""
        return self._next_pool_id

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
        self.reaper.unwatch(pool)
        del self.pools[pool_id]
        return count

    # -- tmem operations --------------------------------------------------------------------
    def put(self, pool_id: int, oid: int, index: int, page: bytes) -> PutResult:
        """Store one page; what became of it (stored, same-filled, raw, or refused and why)."""
        return self.put_batch(pool_id, [(oid, index)], [page])[0]

    def get(self, pool_id: int, oid: int, index: int, exclusive: bool = False) -> bytes | None:
        """The page under a key, or None.  Ephemeral pools and exclusive gets remove it."""
        page = self.get_batch(pool_id, [(oid, index)], exclusive)[0]
        if isinstance(page, PageError):
            raise page
        return page

    def put_batch(
        self, pool_id: int, keys: list[tuple[int, int]], pages: list[bytes]
    ) -> list[PutResult]:
        """Store many pages of one pool; one result per page.  Input is checked before any
        page is stored, so a bad key or page refuses the whole batch with nothing changed."""
        encoder = self.encoder(pool_id)
        pages = check_put_batch(keys, pages)
        return self.file_encoded(pool_id, keys, encoder.encode(keys, pages))

    def encoder(self, pool_id: int) -> PageEncoder:
        """What encodes pages for a pool, apart from the engine: its encode() may run on any
        thread while the engine goes on (the pool's policy is copied)."""
        return PageEncoder(self._threshold, self.pool(pool_id).store_raw)

    def file_encoded(
        self, pool_id: int, keys: list[tuple[int, int]], encoded: list[bytes | None]
    ) -> list[PutResult]:
        """Store a put batch that an encoder() of the pool encoded (pages checked first with
        check_put_batch): each key's old page goes, its new one is stored or refused."""
        pool = self.pool(pool_id)
        if len(keys) != len(encoded):
            raise InvalidPage(f"{len(keys)} keys but {len(encoded)} encoded pages")
        check_keys(keys)
        stats = self.stats
        stats.puts += len(keys)
        for old in pool.index.pop_many(keys):
            if old:
                self._release(pool, old)
                stats.duplicate_puts += 1
        results = []
        handles = []
        filed = 0  # keys[:filed] are in the index already
        same = self.same
        alloc: Allocator
        for item in encoded:
            if item is None:
                handles.append(0)
                results.append(PutResult.REFUSED_POOR_COMPRESSION)
                continue
            if len(item) == WORD:
                handles.append(SAME_TAG | same.ref(item))
                results.append(PutResult.SAME_FILLED)
                continue
            if len(item) == RAW_ZPAGE:
                alloc, tag, result = pool.raw, RAW_TAG, PutResult.STORED_RAW
            else:
                alloc, tag, result = pool.zalloc, ZPAGE_TAG, PutResult.STORED
            handle, filed = self._alloc(pool, alloc, item, keys, handles, filed)
            if handle < 0:
                handles.append(0)
                results.append(PutResult.REFUSED_NO_ROOM)
            else:
                handles.append(tag | handle)
                results.append(result)
        self._file(pool, keys[filed:], handles[filed:])
        for result in results:
            stats.outcomes[result] += 1
        return results

    def get_batch(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> list[bytes | PageError | None]:
        """Pages under many keys of one pool: bytes on a hit, None on a miss, and a PageError
        (CorruptPage or PageUnavailable, not raised) for a page that cannot be returned, so one
        bad page spoils no others."""
        return self.opened(self.read_sealed(pool_id, keys, exclusive).open())

    def read_sealed(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> SealedPages:
        """The engine's half of get_batch: every key looked up (and, for an exclusive get or an
        ephemeral pool, removed) at once, with copies of the zpages in frames left to open()
        (which may run on any thread) and then to opened().  Evicted pages are opened here, as
        a promotion must not bring back a zpage that fails verification."""
        pool = self.pool(pool_id)
        check_keys(keys)
        remove = exclusive or pool.ephemeral
        index = pool.index
        handles = index.pop_many(keys) if remove else index.get_many(keys)
        zalloc = pool.zalloc
        zread, zticks, zshift = zalloc.read, zalloc.lru.tick, zalloc.unit_shift
        promote = not remove and self.config.promote_on_get
        refetch = False  # a promotion may have reclaimed frames behind the prefetched handles
        tick = self.tick
        sealed = SealedPages(keys, [None] * len(keys))
        out, at, zpages = sealed.pages, sealed.at, sealed.zpages
        misses = corrupt = unavailable = 0
        for i, (oid, index_no) in enumerate(keys):
            handle = index.get(oid, index_no) if refetch else handles[i]
            if not handle:
                misses += 1
                continue
            kind = handle >> KIND_SHIFT
            h = handle & HANDLE_MASK
            try:
                if kind == ZPAGE:
                    if not remove:
                        tick += 1
                        zticks[h >> zshift] = tick
                    at.append(i)
                    zpages.append(bytes(zread(h)))  # the slot, padding and all: one copy
                elif kind == SAME:
                    out[i] = self.same.page(h)
                elif kind == EVICTED:
                    zpage = self._evictor().load(pool.id, h)
                    out[i] = open_zpage(zpage, oid, index_no)
                    self.stats.evicted_hits += 1
                    if promote:
                        self.tick = tick
                        self._promote(pool, oid, index_no, h, zpage)
                        tick = self.tick
                        refetch = True
                else:
                    tick += 1
                    pool.raw.lru.tick[h] = tick
                    at.append(i)
                    zpages.append(pool.raw.read(h))
            except CorruptPage as exc:
                out[i] = exc
                corrupt += 1
            except PageUnavailable as exc:
                out[i] = exc
                unavailable += 1
                if remove:  # it may be reachable later: keep it filed
                    index.set_many([(oid, index_no)], [handle])
                    continue
            if remove:
                self._release(pool, handle)
        self.tick = tick
        stats = self.stats
        stats.gets += len(keys)
        stats.misses += misses
        stats.corrupt += corrupt
        stats.unavailable += unavailable
        stats.hits += len(keys) - misses - corrupt - unavailable - len(at)
        return sealed

    def opened(self, sealed: SealedPages) -> list[bytes | PageError | None]:
        """The pages of an opened read_sealed(), its hits and corrupt pages counted."""
        self.stats.hits += sealed.opened - sealed.corrupt
        self.stats.corrupt += sealed.corrupt
        return sealed.pages

    def store_zpages(self, pool_id: int, zpages: list[bytes]) -> list[PutResult]:
        """Store zpages that are already compressed (a peer's evicted pages), each under the key
        its own header names.  A zpage that fails its checksum, or fits no frame (longer than a
        frame and not a raw page), refuses the whole batch before anything changes."""
        pool = self.pool(pool_id)
        keys = []
        for zpage in zpages:
            if type(zpage) is not bytes or not 0 < zpage_length(zpage) == len(zpage):
                raise InvalidPage("a zpage must be one intact zpage (header, payload, checksum)")
            if PAGE_SIZE < len(zpage) != RAW_ZPAGE:
                raise InvalidPage(
                    f"a zpage of {len(zpage)} bytes fits no frame: at most {PAGE_SIZE} bytes, or "
                    f"{RAW_ZPAGE} for a raw page"
                )
            keys.append(zpage_key(zpage))
        for old in pool.index.pop_many(keys):
            if old:
                self._release(pool, old)
        results = []
        handles: list[int] = []
        filed = 0
        for zpage in zpages:
            raw = len(zpage) == RAW_ZPAGE
            alloc: Allocator = pool.raw if raw else pool.zalloc
            handle, filed = self._alloc(pool, alloc, zpage, keys, handles, filed)
            handles.append(pool.tag_of(alloc) | handle if handle >= 0 else 0)
            if handle < 0:
                results.append(PutResult.REFUSED_NO_ROOM)
            else:
                results.append(PutResult.STORED_RAW if raw else PutResult.STORED)
        self._file(pool, keys[filed:], handles[filed:])
        for result in results:
            self.stats.outcomes[result] += 1
        return results

    def read_zpages(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> list[bytes | None]:
        """The stored zpages (still compressed, unverified) under keys, None where absent;
        an exclusive read removes them.  What a node sends to a peer or back to an owner."""
        pool = self.pool(pool_id)
        check_keys(keys)
        handles = pool.index.pop_many(keys) if exclusive else pool.index.get_many(keys)
        out: list[bytes | None] = []
        for (oid, index), handle in zip(keys, handles, strict=True):
            kind = handle >> KIND_SHIFT
            h = handle & HANDLE_MASK
            if not handle:
                out.append(None)
            elif kind == SAME:
                out.append(make_zpage(oid, index, compress(self.same.page(h))))
            elif kind == EVICTED:
                out.append(self._evictor().load(pool.id, h))
            else:
                slot = pool.allocator_of(handle).read(h)
                out.append(zpage_bytes(slot))
            if exclusive and handle:
                self._release(pool, handle)
        return out

    def evicted_locations(self, pool_id: int, keys: list[tuple[int, int]]) -> list[int]:
        """Per key, the evictor's location if the page is evicted, else 0."""
        return [
            h & HANDLE_MASK if h >> KIND_SHIFT == EVICTED else 0
            for h in self.pool(pool_id).index.get_many(keys)
        ]

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
        """Move zpages to give back whole frames; the number of frames freed.  Only pools whose
        allocator wastes at least a zspage's worth of slots in some size class are touched (the
        reaper also does this, before it evicts anything)."""
        return self.reaper.compact()

    def write_back_all(self) -> tuple[int, int]:
        """Hand every persistent page in RAM (zpages, raw frames, same-filled pages) to the
        evictor, as a node stopping gracefully does; (pages handed over, pages refused).
        Refused pages stay in RAM; ephemeral pages are left alone.  Without an evictor every
        persistent page in RAM counts as refused."""
        return self.reaper.write_back_all()

    # -- internals --------------------------------------------------------------------------
    def _file(self, pool: Pool, keys: list[tuple[int, int]], handles: list[int]) -> None:
        for displaced in pool.index.set_many(keys, handles):
            self._release(pool, displaced)

    def _alloc(
        self,
        pool: Pool,
        alloc: Allocator,
        zpage: bytes,
        keys: list[tuple[int, int]],
        handles: list[int],
        filed: int,
    ) -> tuple[int, int]:
        """Allocate the next zpage of a batch whose keys[:filed] are in the index and whose
        handles so far are `handles`.  At the limit, the stored part is filed first (the reaper
        checks every zpage it evicts against the index) and frames are reclaimed.  Returns the
        handle (-1: no room) and how much of the batch is now filed."""
        self.tick += 1
        handle = alloc.alloc(zpage, self.tick)
        if handle >= 0:
            return handle, filed
        done = len(handles)
        self._file(pool, keys[filed:done], handles[filed:done])
        return self._alloc_reclaiming(alloc, zpage), done

    def _alloc_reclaiming(self, alloc: Allocator, zpage: bytes) -> int:
        """Allocate after reclaiming down to the low mark; -1 if there is still no room."""
        self.reaper.reclaim(self._low_mark)
        self.tick += 1
        return alloc.alloc(zpage, self.tick)

    def _promote(self, pool: Pool, oid: int, index: int, location: int, zpage: bytes) -> None:
        """Move an evicted zpage back into RAM, if room can be made; else it stays evicted."""
        raw = len(zpage) == HEADER_SIZE + PAGE_SIZE
        alloc: Allocator = pool.raw if raw else pool.zalloc
        self.tick += 1
        handle = alloc.alloc(zpage, self.tick)
        if handle < 0:
            handle = self._alloc_reclaiming(alloc, zpage)
            if handle < 0:
                return
        pool.index.replace(oid, index, pool.tag_of(alloc) | handle)
        self._evictor().forget(pool.id, location)
        pool.evicted -= 1
        self.stats.promoted += 1

    def _evictor(self) -> Evictor:
        if self.evictor is None:
            raise InvariantViolation("an evicted page was found but this zcache has no evictor")
        return self.evictor

    def _release(self, pool: Pool, handle: int) -> None:
        kind = handle >> KIND_SHIFT
        if kind == SAME:
            self.same.unref(handle & HANDLE_MASK)
        elif kind == EVICTED:
            self._evictor().forget(pool.id, handle & HANDLE_MASK)
            pool.evicted -= 1
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
        """Pages under a key, wherever they are (RAM, same-filled, evicted)."""
        return sum(p.index.count for p in self.pools.values())

    @property
    def evicted_pages(self) -> int:
        return sum(p.evicted for p in self.pools.values())

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
            kinds = [h >> KIND_SHIFT for *_, h in pool.index.items()]
            if kinds.count(EVICTED) != pool.evicted:
                raise InvariantViolation(f"pool {pool.id} miscounts its evicted pages")
            if pool.index.count != pool.zalloc.zpages + pool.raw.zpages + kinds.count(SAME) + (
                pool.evicted
            ):
                raise InvariantViolation(f"pool {pool.id} index count disagrees with its zpages")
        if len(frames) != self.arena.in_use:
            raise InvariantViolation(
                f"arena has {self.arena.in_use} frames in use, allocators own {len(frames)}"
            )

    def close(self) -> None:
        self.pools.clear()
        self.arena.close()
