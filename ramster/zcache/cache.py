# ZCache: tmem semantics over the codec, the allocators, the pageframe arena and the reaper.
#
# The index of each pool maps a key to one 64-bit handle that says where the page is (in an
# allocator, raw in a frame, as a same-filled word, or with the evictor: see handles.py).
#
# A put validates, drops any old page under the key (a rejected duplicate put never leaves stale
# data behind), compresses (a page LZ4 packs very small is then checked for being same-filled),
# passes the bouncer (poor compression, no room) and files the handle.  Refusals are counted per
# reason and returned, not raised.  When an allocation hits the pool limit the reaper frees frames
# down to the low mark and the put is retried once; only then is it refused for no room.  A get
# verifies the zpage's checksum and key before decompressing, wherever the zpage came from (RAM,
# disk, a peer), so corruption surfaces as CorruptPage and never as wrong bytes.  The second
# non-exclusive get of an evicted persistent page since it was evicted brings it back to RAM,
# still compressed, if the pool has room (never by evicting another); the first only marks it
# (a kind of its handle, no extra byte).  So a pass that reads a region once (a scan, a backup,
# a client faulting pages in that it then keeps) leaves its copies where they are, costing no
# flushes to holders and no churn, while a page read again is hot and comes home (as Linux's LRU
# activates a page only on its second access).  Ephemeral pools (cleancache) lose a page on get;
# persistent pools (frontswap) keep it unless the get is exclusive.
#
# Batches are the core paths (single put/get wrap them): per-page Python overhead is what limits
# an engine whose budget is a small multiple of one LZ4 call.  The index of a put batch is written
# after its pages are stored; before any reclaim the part stored so far is filed, because the
# reaper finds a zpage's key in its header and checks it against the index.
#
# Each batch path is also offered in halves (halves.py): encode, then file_encoded, for a put;
# read_sealed, then open, for a get; the pure halves may run on other threads.
#
# Pools can be created under a given id (a node restoring its pool registry, before the evictor's
# recovered pages are filed), and each pool may override the engine's store-raw policy (a block
# device's pool must never refuse a page for poor compression).  A pool may also be told that a
# missing page means zeros (a block device's: drop_zero_pages): a page of zero bytes put into it
# then empties its key, as a flush does, instead of being kept as a same-filled word, so it holds
# nothing anywhere (RAM, peers, the backing file) and reads as a hole.
#
# A persistent page in RAM must be savable at a graceful stop (write_back_all): with `save_room`
# (the node's backing file's cover(), backing.py), every put batch into a persistent pool, and
# every promotion, first asks whether the disk holds room for all the persistent pages in RAM
# plus the new ones (each counted a frame of its own, the worst case), and is refused for no
# room (a promotion not made) if it cannot.  The count walks the pools, so it asks for
# SAVE_AHEAD pages more than it needs and counts them down before asking again (when that much
# cannot be had, it asks for just the batch, every batch).
#
# Outsiders read the engine through its face: snapshot() (a frozen copy of every count,
# snapshot.py) and narrow methods (pool_ids, has_pool, pool_pages, object_ids, keys), never its
# pools, indexes, allocators or reaper.  Input checks live in validate.py, the slow structural
# check in verify.py.
#
# The engine is synchronous and single-threaded: callers serialise access (the node does so on
# its event loop), which keeps every structure lock-free; only the pure halves may run on other
# threads, and a snapshot, once taken, may be read anywhere.
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import cast

from ramster.zcache._codec import open_zpages_at
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
)
from ramster.zcache.config import ALLOCATORS, PoolKind, PutResult, ZCacheConfig
from ramster.zcache.errors import (
    CorruptPage,
    InvalidConfig,
    InvalidPage,
    InvariantViolation,
    PageError,
    PageUnavailable,
    UnknownPool,
)
from ramster.zcache.evictor import Evictor
from ramster.zcache.halves import Encodings, PageEncoder, SealedPages, place_opened
from ramster.zcache.handles import (
    EVICTED,
    EVICTED_READ_TAG,
    EVICTED_TAG,
    HANDLE_MASK,
    KIND_SHIFT,
    RAW,
    RAW_TAG,
    SAME,
    SAME_TAG,
    ZPAGE_TAG,
)
from ramster.zcache.pool import Pool, PoolSpec
from ramster.zcache.rawframes import RAW_ZPAGE, RawFrames
from ramster.zcache.reaper import Reaper
from ramster.zcache.samefill import SameFilledWords
from ramster.zcache.snapshot import Snapshot, take
from ramster.zcache.stats import Stats
from ramster.zcache.validate import (
    check_key,
    check_keys,
    check_pool_id,
    check_put_batch,
    check_zpages,
)
from ramster.zcache.verify import verify
from ramster.zcache.zbud import Zbud
from ramster.zcache.zsmalloc import Zsmalloc

ABSENT, STORED = 0, 1  # page_states(): PageIndex.states()
ZERO_WORD = bytes(8)
SAVE_AHEAD = 1024  # pages save_room is asked about ahead of need (see the header)


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
        self.arena = Arena(self.config.pool_limit_frames)
        self.evictor = evictor
        self.reaper = Reaper(self)
        self.pools: dict[int, Pool] = {}
        self.same = SameFilledWords()
        self.stats = Stats()
        self.tick = 0
        self._next_pool_id = 0
        self._threshold = self.config.compress_threshold
        self._low_mark = int(self.config.pool_limit_frames * self.config.reclaim_to)
        self.reclaim_step: int | None = None  # frames one reclaim may free (reclaim_some)
        self.on_reclaim: Callable[[], None] | None = None  # ... told when it stopped short
        # whether the disk has room to save `pages` persistent pages in `frames` frames of RAM
        self.save_room: Callable[[int, int], bool] | None = None
        self._save_ahead = 0  # pages more than RAM holds that save_room said yes to
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
        pool_id = check_pool_id(pool_id)
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

    def drop_zero_pages(self, pool_id: int) -> None:
        """From now on a page of zero bytes put into this pool is not kept: its key is emptied
        (an old page under it goes, as with any put), a get of it misses and the put reports
        SAME_FILLED.  For a block device, whose missing blocks read as zeros: such a page then
        costs nothing and is a hole in its map, before and after a restart, instead of a word
        in RAM that a graceful stop would write to the backing file as data."""
        self.pool(pool_id).zeros_absent = True

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
        return self._file_encoded(self.pool(pool_id), keys, encoder.encode(keys, pages))

    def encoder(self, pool_id: int) -> PageEncoder:
        """What encodes pages for a pool, apart from the engine: its encode() may run on any
        thread while the engine goes on (the pool's policy is copied)."""
        return PageEncoder(self._threshold, self.pool(pool_id).store_raw)

    def file_encoded(
        self,
        pool_id: int,
        keys: list[tuple[int, int]],
        encoded: Encodings,
        keys_checked: bool = False,
    ) -> list[PutResult]:
        """Store a put batch that an encoder() of the pool encoded (pages checked first with
        check_put_batch): each key's old page goes, its new one is stored or refused.  A
        caller that checked the keys already (check_put_batch over a whole batch it files in
        parts) says so with `keys_checked`."""
        pool = self.pool(pool_id)
        if len(keys) != len(encoded):
            raise InvalidPage(f"{len(keys)} keys but {len(encoded)} encoded pages")
        if not keys_checked:
            check_keys(keys)
        return self._file_encoded(pool, keys, encoded)

    def _file_encoded(
        self, pool: Pool, keys: list[tuple[int, int]], encoded: Encodings
    ) -> list[PutResult]:
        """file_encoded() once its keys are checked (put_batch checked them already)."""
        stats = self.stats
        stats.puts += len(keys)
        replaced = pool.index.remove_many(keys)
        stats.duplicate_puts += len(replaced)
        self.release_all(pool, replaced)
        if not pool.ephemeral and not self._room_to_save(len(keys)):
            stats.outcomes[PutResult.REFUSED_NO_ROOM] += len(keys)
            return [PutResult.REFUSED_NO_ROOM] * len(keys)
        results: list[PutResult] = []
        handles: list[int] = []
        filed = 0  # keys[:filed] are in the index already
        zalloc, file, file_raw = pool.zalloc.alloc, pool.zalloc.file, pool.raw.file_run
        stored, stored_raw = PutResult.STORED, PutResult.STORED_RAW
        tick = self.tick  # self.tick is brought up to date before any slow path
        count, i = len(encoded), -1
        words: list[int] = []  # the same-filled words the native filing passed over
        raw = False  # the last page was raw: the next likely is too (incompressible data)
        while (i := i + 1) < count:
            # most zpages, many in one call; it stops at any other case (so not after a raw
            # page, where a call per page cost more than filing the page)
            if file is not None and not raw:
                i, tick = file(encoded, i, ZPAGE_TAG, tick, stored, handles, results, words)
                if words:
                    self._file_words(pool, encoded, words, handles, results)
                if i == count:
                    break
            item = encoded[i]
            raw = item is not None and len(item) == RAW_ZPAGE
            if raw:
                # a run of raw pages in one call; it stops at anything else, at the arena's
                # limit and at the first page of an empty LRU list, which take the paths below
                at = i
                i, tick = file_raw(encoded, i, RAW_TAG, tick, stored_raw, handles, results)
                if i == count:
                    break
                if i != at:  # what ended the run goes round again
                    i, raw = i - 1, False
                    continue
            if item is not None and WORD < len(item) != RAW_ZPAGE:  # a zpage: the common case
                tick += 1
                handle = zalloc(item, tick)
                if handle >= 0:
                    handles.append(ZPAGE_TAG | handle)
                    results.append(stored)
                    continue
                self.tick = tick
                handle, filed = self._alloc_at_limit(pool, pool.zalloc, item, keys, handles, filed)
                tag, result = ZPAGE_TAG, stored
            elif item is None:
                handles.append(0)
                results.append(PutResult.REFUSED_POOR_COMPRESSION)
                continue
            elif len(item) == WORD:
                handles.append(self._same_handle(pool, item))
                results.append(PutResult.SAME_FILLED)
                continue
            else:
                self.tick = tick
                handle, filed = self._alloc(pool, pool.raw, item, keys, handles, filed)
                tag, result = RAW_TAG, stored_raw
            tick = self.tick
            if handle < 0:
                handles.append(0)
                results.append(PutResult.REFUSED_NO_ROOM)
            else:
                handles.append(tag | handle)
                results.append(result)
        self.tick = tick
        self._file(pool, keys[filed:], handles[filed:])
        outcomes, rest = stats.outcomes, len(results)
        for common in (stored, stored_raw):  # counted by identity, at C speed
            if n := results.count(common):
                outcomes[common] += n
                rest -= n
        if rest:  # Counter hashes each enum member in Python: only the rest
            others = Counter(r for r in results if r is not stored and r is not stored_raw)
            for result, n in others.items():
                outcomes[result] += n
        return results

    def _file_words(
        self,
        pool: Pool,
        encoded: Encodings,
        at: list[int],
        handles: list[int],
        results: list[PutResult],
    ) -> None:
        """The same-filled words a native filing passed over (at positions `at`, emptied)."""
        for i in at:
            handles[i] = self._same_handle(pool, cast(bytes, encoded[i]))
            results[i] = PutResult.SAME_FILLED
        at.clear()

    def _same_handle(self, pool: Pool, word: bytes) -> int:
        """The handle of a same-filled page: its word's, or 0 (no page: the key is emptied)
        for a page of zero bytes in a pool whose missing pages mean zeros."""
        if pool.zeros_absent and word == ZERO_WORD:
            return 0
        return SAME_TAG | self.same.ref(word)

    def get_batch(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> list[bytes | PageError | None]:
        """Pages under many keys of one pool: bytes on a hit, None on a miss, and a PageError
        (CorruptPage or PageUnavailable, not raised) for a page that cannot be returned, so one
        bad page spoils no others."""
        return self._read(pool_id, keys, exclusive, copy=False).pages

    def read_sealed(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False
    ) -> SealedPages:
        """The engine's half of get_batch: every key looked up (and, for an exclusive get or an
        ephemeral pool, removed) at once, with copies of the zpages in frames left to open()
        (which may run on any thread) and then to opened().  Evicted pages are opened here, as
        a promotion must not bring back a zpage that fails verification."""
        return self._read(pool_id, keys, exclusive, copy=True)

    def _read(
        self, pool_id: int, keys: list[tuple[int, int]], exclusive: bool, copy: bool
    ) -> SealedPages:
        """read_sealed() when `copy`; else get_batch(), whose zpages in frames are opened in
        place, in the arena, all in one native call after the walk (nothing in the walk changes
        a frame that holds one: a promotion, which fills free room, opens those waiting first),
        but for those that straddle two frames, which are read out first, and those of a get
        that removes, opened before their slots are freed."""
        pool = self.pool(pool_id)
        check_keys(keys)
        remove = exclusive or pool.ephemeral
        index = pool.index
        handles = index.pop_many(keys) if remove else index.get_many(keys)
        zalloc = pool.zalloc
        zread, zlocate, zticks, zshift = (
            zalloc.read,
            zalloc.locate,
            zalloc.lru.tick,
            zalloc.unit_shift,
        )
        view = self.arena.view
        promote = not remove and self.config.promote_on_get
        tick = self.tick
        sealed = SealedPages(keys, [None] * len(keys))
        out, at, zpages, starts = sealed.pages, sealed.at, sealed.zpages, sealed.starts
        misses = corrupt = unavailable = 0
        moved: set[tuple[int, int]] = set()  # keys marked read or brought home by this batch
        in_place: list[int] = []  # positions of zpages to open where they lie in the arena ...
        offsets: list[int] = []  # ... and where they start
        forgotten: list[int] = []  # evicted copies no longer needed: forgotten in one call
        walk = None if remove else zalloc.walk
        count, i = len(keys), -1
        try:
            while (i := i + 1) < count:
                # Zpages and misses, many in one call.  A key `moved` earlier in the batch had an
                # evicted handle, where any walk stops: its handle is looked up again below.
                if walk is not None:
                    i, tick, missed = walk(
                        handles, i, ZPAGE_TAG, HANDLE_MASK, tick, copy,
                        at, zpages, starts, in_place, offsets,
                    )  # fmt: skip
                    misses += missed
                    if i == count:
                        break
                (oid, index_no), handle = keys[i], handles[i]
                if moved and (oid, index_no) in moved:  # named again: its handle changed
                    handle = index.get(oid, index_no)
                h = handle ^ ZPAGE_TAG
                try:
                    if h <= HANDLE_MASK:  # a zpage in the pool's allocator: the common case
                        if not remove:
                            tick += 1
                            zticks[h >> zshift] = tick
                        if copy:
                            sealed.wait(i, zread(h))  # a copy of the slot, padding and all
                        elif (start := zlocate(h)) < 0:  # straddles two frames
                            out[i] = open_zpage(zread(h), oid, index_no)
                        elif remove:  # opened in place before its slot is freed below
                            out[i] = open_zpage(view, oid, index_no, start)
                        else:  # opened in place with the others, after the walk
                            in_place.append(i)
                            offsets.append(start)
                    elif not handle:
                        misses += 1
                        continue
                    elif (kind := handle >> KIND_SHIFT) == SAME:
                        out[i] = self.same.page(handle & HANDLE_MASK)
                    elif kind >= EVICTED:
                        h = handle & HANDLE_MASK
                        zpage = self._evictor().load(pool.id, h)
                        out[i] = open_zpage(zpage, oid, index_no)
                        self.stats.evicted_hits += 1
                        if promote and kind == EVICTED:  # read once: marked, home if again
                            index.replace(oid, index_no, EVICTED_READ_TAG | h)
                            moved.add((oid, index_no))
                        elif promote:  # read again: home, into free room only
                            corrupt += _open_at(view, keys, out, in_place, offsets)
                            self.tick = tick
                            if self._promote(pool, oid, index_no, h, zpage, forgotten):
                                moved.add((oid, index_no))
                            tick = self.tick
                    else:
                        h = handle & HANDLE_MASK
                        tick += 1
                        pool.raw.lru.tick[h] = tick
                        if copy:
                            sealed.wait(i, pool.raw.read(h))
                        else:
                            out[i] = open_zpage(pool.raw.read(h), oid, index_no)
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
                    self._release(pool, handle, forgotten)
            corrupt += _open_at(view, keys, out, in_place, offsets)
            if at and not copy:  # zpages the walk copied out (straddling two frames)
                corrupt += sealed.open().corrupt
        finally:
            if forgotten:  # before the caller answers (a removed page never comes back)
                self._evictor().forget(pool.id, forgotten)
        self.tick = tick
        stats = self.stats
        stats.gets += len(keys)
        stats.misses += misses
        stats.corrupt += corrupt
        stats.unavailable += unavailable
        stats.hits += len(keys) - misses - corrupt - unavailable - len(sealed.at)
        return sealed

    def opened(self, sealed: SealedPages) -> list[bytes | PageError | None]:
        """The pages of an opened read_sealed(), its hits and corrupt pages counted."""
        self.stats.hits += sealed.opened - sealed.corrupt
        self.stats.corrupt += sealed.corrupt
        return sealed.pages

    def store_zpages(
        self, pool_id: int, zpages: list[bytes], made: list[tuple[int, int]] | None = None
    ) -> list[PutResult]:
        """Store zpages that are already compressed (a peer's evicted pages), each under the key
        its own header names.  A zpage that fails its checksum, or fits no frame (longer than a
        frame and not a raw page), refuses the whole batch before anything changes.  `made`:
        the keys of zpages the caller has just made (make_zpage) of blobs that fit a frame, so
        they are intact and are not checked again."""
        pool = self.pool(pool_id)
        keys = check_zpages(zpages) if made is None else made
        self.release_all(pool, pool.index.remove_many(keys))
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
            elif kind >= EVICTED:
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
            h & HANDLE_MASK if h >> KIND_SHIFT >= EVICTED else 0
            for h in self.pool(pool_id).index.get_many(keys)
        ]

    def page_states(self, pool_id: int, oid: int, start: int, stop: int) -> bytes:
        """Per page index start..stop-1 of an object, whether it holds a page (STORED,
        wherever it is) or not (ABSENT), for a block device's allocation map."""
        return self.pool(pool_id).index.states(oid, start, stop)

    def flush_page(self, pool_id: int, oid: int, index: int) -> bool:
        """Forget the page under a key; whether there was one."""
        pool = self.pool(pool_id)
        check_key(oid, index)
        handle = pool.index.pop(oid, index)
        if handle:
            self._release(pool, handle)
            self.stats.flushes += 1
        return bool(handle)

    def flush_pages(self, pool_id: int, keys: list[tuple[int, int]]) -> int:
        """flush_page() of many keys, in a few native calls (the index's, the allocator's batch
        frees); how many held a page."""
        pool = self.pool(pool_id)
        check_keys(keys)
        handles = pool.index.remove_many(keys)
        self.release_all(pool, handles)
        self.stats.flushes += len(handles)
        return len(handles)

    def object_chunks(self, pool_id: int, oid: int) -> list[int]:
        """Where an object holds pages: its index chunks' numbers (pages n << CHUNK_BITS on,
        CHUNK of them), for a caller that flushes it a few chunks at a time."""
        check_key(oid, 0)
        return self.pool(pool_id).index.chunks_of(oid)

    def flush_object(self, pool_id: int, oid: int) -> int:
        """Forget every page of an object; how many there were."""
        pool = self.pool(pool_id)
        check_key(oid, 0)
        found = pool.index.pop_object(oid)
        forgotten: list[int] = []
        for _, handle in found:
            self._release(pool, handle, forgotten)
        if forgotten:
            self._evictor().forget(pool_id, forgotten)
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
        return self._alloc_at_limit(pool, alloc, zpage, keys, handles, filed)

    def _alloc_at_limit(
        self,
        pool: Pool,
        alloc: Allocator,
        zpage: bytes,
        keys: list[tuple[int, int]],
        handles: list[int],
        filed: int,
    ) -> tuple[int, int]:
        """_alloc() once the allocator has refused: file, reclaim, try again."""
        done = len(handles)
        self._file(pool, keys[filed:done], handles[filed:done])
        return self._alloc_reclaiming(alloc, zpage), done

    def _alloc_reclaiming(self, alloc: Allocator, zpage: bytes) -> int:
        """Allocate after reclaiming (reclaim_some); -1 if there is still no room."""
        self.reclaim_some()
        self.tick += 1
        return alloc.alloc(zpage, self.tick)

    def reclaim_some(self) -> bool:
        """Reclaim toward the low mark: down to it in one go, or, with `reclaim_step` set, that
        many frames at most, and tell `on_reclaim` if frames above the low mark are left, so
        that its owner goes on a step at a time (the node's event loop does, between other
        work: one reclaim of a tenth of a 256 MiB pool stalled it 150 ms, and the default pool
        is a quarter of RAM).  Whether that is so: frames were freed and more are left."""
        target, step = self._low_mark, self.reclaim_step
        if step is not None:
            target = max(target, self.arena.in_use - step)
        freed = self.reaper.reclaim(target)
        more = freed > 0 and self.arena.in_use > self._low_mark
        if more and self.on_reclaim is not None:
            self.on_reclaim()
        return more

    def _promote(
        self, pool: Pool, oid: int, index: int, location: int, zpage: bytes, forgotten: list[int]
    ) -> bool:
        """Move an evicted zpage back into RAM if there is room for it (and on disk to save it
        at a stop); else it stays evicted.
        Never by evicting another page: under pressure that only moves the cost around (one
        page out for each page in, with its copies placed again), and the client that just
        read the page holds it itself (a swap-in, a page cache).  Whether it moved; its old
        location joins `forgotten`, for the caller to forget."""
        if not self._room_to_save(1):
            return False
        raw = len(zpage) == HEADER_SIZE + PAGE_SIZE
        alloc: Allocator = pool.raw if raw else pool.zalloc
        self.tick += 1
        handle = alloc.alloc(zpage, self.tick)
        if handle < 0:
            return False
        pool.index.replace(oid, index, pool.tag_of(alloc) | handle)
        forgotten.append(location)
        pool.evicted -= 1
        self.stats.promoted += 1
        return True

    def _room_to_save(self, pages: int) -> bool:
        """Whether the disk could save every persistent page in RAM and `pages` more at a
        graceful stop (see the header); always, without save_room."""
        if self.save_room is None:
            return True
        if self._save_ahead >= pages:
            self._save_ahead -= pages
            return True
        held = frames = 0
        for pool in self.pools.values():
            if not pool.ephemeral:
                held += pool.index.count - pool.evicted
                frames += pool.zalloc.frames + pool.raw.frames
        for ahead in (SAVE_AHEAD, 0):
            extra = pages + ahead
            if self.save_room(held + extra, frames + extra):
                self._save_ahead = ahead
                return True
        self._save_ahead = 0
        return False

    def _evictor(self) -> Evictor:
        if self.evictor is None:
            raise InvariantViolation("an evicted page was found but this zcache has no evictor")
        return self.evictor

    def release_all(self, pool: Pool, handles: list[int]) -> None:
        """_release() of many index handles (the pages a batch replaces or flushes, the zpages
        the reaper evicted), the runs of the pool's zpages and raw pages in the allocators'
        batch frees where they have them."""
        free_many, count, i = pool.zalloc.free_many, len(handles), 0
        words: list[int] = []  # the same-filled words the native frees passed over
        unref = self.same.unref
        while i < count:
            # a run of zpages natively (not from a raw page: those free in runs of their own)
            if free_many is not None and handles[i] >> KIND_SHIFT != RAW:
                i = free_many(handles, i, ZPAGE_TAG, HANDLE_MASK, SAME_TAG, words)
                for at in words:
                    unref(handles[at] & HANDLE_MASK)
                words.clear()
                if i == count:
                    return
            if handles[i] >> KIND_SHIFT == RAW:  # a run of raw pages natively
                i = pool.raw.free_run(handles, i, RAW_TAG, HANDLE_MASK)
                continue
            self._release(pool, handles[i])
            i += 1

    def _release(self, pool: Pool, handle: int, forgotten: list[int] | None = None) -> None:
        """Free what `handle` holds; an evicted copy is forgotten at once, or added to
        `forgotten` for the caller to forget with others in one call."""
        kind = handle >> KIND_SHIFT
        if kind == SAME:
            self.same.unref(handle & HANDLE_MASK)
        elif kind >= EVICTED:
            if forgotten is None:
                self._evictor().forget(pool.id, [handle & HANDLE_MASK])
            else:
                forgotten.append(handle & HANDLE_MASK)
            pool.evicted -= 1
        else:
            pool.allocator_of(handle).free(handle & HANDLE_MASK)

    # -- the read-only face ------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A frozen copy of the engine's counts, per pool and in total, that agree with each
        other; it may be read on any thread once taken (take it on the engine's)."""
        return take(self)

    def pool_ids(self) -> tuple[int, ...]:
        return tuple(self.pools)

    def has_pool(self, pool_id: int) -> bool:
        return pool_id in self.pools

    def pool_pages(self, pool_id: int) -> int:
        """Pages a pool holds, wherever they are (RAM, same-filled, evicted)."""
        return self.pool(pool_id).index.count

    def pool_frames(self, pool_id: int) -> int:
        """Frames a pool's allocators own."""
        return self.pool(pool_id).frames

    def object_ids(self, pool_id: int) -> list[int]:
        """The objects of a pool that hold at least one page."""
        return list(self.pool(pool_id).index.objects)

    def keys(self, pool_id: int) -> list[tuple[int, int]]:
        """Every key of a pool that holds a page."""
        return [(oid, index) for oid, index, _ in self.pool(pool_id).index.items()]

    @property
    def frames(self) -> int:
        return self.arena.in_use

    @property
    def zpages_in_frames(self) -> int:
        return sum(p.zpages for p in self.pools.values())

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
        """Check every structural invariant; raise InvariantViolation on the first broken one
        (a full scan: for tests)."""
        verify(self)

    def close(self) -> None:
        self.pools.clear()
        self.arena.close()


def _open_at(
    view: memoryview,
    keys: list[tuple[int, int]],
    out: list[bytes | PageError | None],
    at: list[int],
    offsets: list[int],
) -> int:
    """Open the zpages at `offsets` in the arena into `out` at positions `at` in one native
    call, then empty both lists; the number found corrupt."""
    if not at:
        return 0
    corrupt = place_opened(out, at, open_zpages_at([keys[i] for i in at], view, offsets))
    at.clear()
    offsets.clear()
    return corrupt
