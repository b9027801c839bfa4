# Foreign pages: what this node holds in its RAM for its peers.
#
# They live in a zcache of their own, apart from the node's own pages, with its own limit (the
# foreign pool limit) and no evictor: a holder never writes a peer's page to its disk or passes it
# on; when full it refuses and the owner places the page elsewhere.  Pages are kept in one zcache
# pool per (owner node, owner incarnation, epoch, owner pool).  An owner back from a restart asks
# for its pages (`reclaim`): they move under its new incarnation and the epoch it names, and it
# learns their keys (it flushes those it no longer knows).
#
# What a holder stores is opaque: owners seal their zpages (node/sealing.py), so a holder cannot
# read their headers, and every blob comes with the owner's slot for it (its row in the owner's
# table, ramster/remote/table.py), which the holder files it under: key (HEAD, slot) in the
# owner's pool.  Slots are dense, so the engine's index costs ~9 bytes per copy.  A blob is
# wrapped in a zpage header of its own (make_zpage(HEAD, slot, blob)), which gives the engine its
# key and a checksum against bit rot in this node's RAM (stored as just made, without a second
# check), and is unwrapped on the way out.  A blob that does not fit a slot once wrapped (more
# than MAX_BLOB bytes: an incompressible page, stored raw by its owner and sealed, is 4142) is
# kept in two: its first MAX_BLOB bytes under (HEAD, slot), the rest under (TAIL, slot), both
# stored or neither, joined again on the way out; a put to a slot drops the tail it held, so
# a head of MAX_BLOB bytes with a tail beside it is always one blob.  Longer than MAX_SPLIT, a
# blob is refused, never truncated.  (Before, a sealed raw page fitted no frame, so the pages
# of an export of incompressible data, an encrypted swap device say, had no copy but on their
# owner's disk, whatever --replicas said.)  Trade-off: a long blob costs a slot of the largest
# class, a whole frame, plus a small one and a second index entry; a tail is no page of its
# own, so the counts (`pages`, `pages_by_owner`) leave tails out, read from the index.
#
# Limits, so that no caller can take the store from the others (the owner id is whatever the
# request claims until the peer listener authenticates it with mTLS; then it is the certificate's):
# - each owner gets a share of the capacity (`owner_share`), and each of its foreign pools costs
#   it POOL_FRAMES of that share (a pool's metadata is not free), so many tiny pools cannot exhaust
#   the node's memory outside the frames;
# - at most `max_owners` distinct owners hold pages at once (the cluster's size): inventing owner
#   ids cannot multiply the shares;
# - a put that stores nothing leaves nothing behind (no empty pool is kept).
# A put with a new incarnation does not drop the old incarnation's pages: only the owner's
# `reclaim` (after a restart) or its flushes do, so a stray or forged "restarted" put costs
# nobody their pages.
#
# Trade-off: the wrapping header costs 18 bytes per page (36 for a long blob), for pages the
# holder can check and evict by key like its own.
from __future__ import annotations

from dataclasses import dataclass

from ramster.zcache import STORED, PoolKind, ZCache, ZCacheConfig, check_keys
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE, make_zpage
from ramster.zcache.index import CHUNK_BITS

PoolTag = tuple[str, str, int, int]  # owner node id, owner incarnation, epoch, owner pool id
MAX_BLOB = PAGE_SIZE - HEADER_SIZE  # the longest blob that fits a slot once wrapped
MAX_SPLIT = 2 * MAX_BLOB  # the longest blob: its head in one slot, its tail in another
HEAD, TAIL = 0, 1  # the objects of an owner's pool: the blobs (their heads), and long blobs' tails
POOL_FRAMES = 2  # quota charged per foreign pool: its index and allocator metadata (~6 KiB)
DEFAULT_MAX_OWNERS = 64


def _keys(slots: list[int]) -> list[tuple[int, int]]:
    """The engine keys the copies of `slots` are filed under (checked: a slot is an index)."""
    keys = [(HEAD, slot) for slot in slots]
    check_keys(keys)
    return keys


def blob_fits(size: int) -> bool:
    """Whether a blob of `size` bytes can be held: in one slot, or split over two."""
    return 0 < size <= MAX_SPLIT


@dataclass(frozen=True)
class OwnerTag:
    node_id: str
    incarnation: str


class ForeignStore:
    def __init__(
        self,
        capacity_frames: int,
        owner_share: float = 0.5,
        max_owners: int = DEFAULT_MAX_OWNERS,
    ) -> None:
        if not 0 < owner_share <= 1:
            raise ValueError(f"owner_share must be in (0, 1], got {owner_share}")
        if max_owners < 1:
            raise ValueError(f"max_owners must be at least 1, got {max_owners}")
        self.capacity_frames = capacity_frames
        self.owner_quota = max(1, int(capacity_frames * owner_share))
        self.max_owners = max_owners
        self.cache = ZCache(ZCacheConfig(pool_limit_frames=capacity_frames))
        self.pools: dict[PoolTag, int] = {}
        self.refused = 0
        self.moved = 0  # zpages stored and served (the node trims its heap after many)

    def _owner_frames(self, node_id: str) -> int:
        """What `node_id` uses of its quota: its frames, plus POOL_FRAMES per pool."""
        return sum(
            self.cache.pool_frames(p) + POOL_FRAMES
            for tag, p in self.pools.items()
            if tag[0] == node_id
        )

    def owners(self) -> set[str]:
        return {tag[0] for tag in self.pools}

    def put(
        self,
        owner: OwnerTag,
        epoch: int,
        pool_id: int,
        slots: list[int],
        blobs: list[bytes],
    ) -> list[bool]:
        """Store an owner's blobs under their slots; per blob whether it was taken.  A blob that
        does not fit, or finds no room in the owner's share, is refused (the owner places it
        elsewhere)."""
        if len(slots) != len(blobs):
            raise ValueError(f"{len(slots)} slots for {len(blobs)} blobs")
        keys = _keys(slots)
        stored = [False] * len(blobs)
        tag = (owner.node_id, owner.incarnation, epoch, pool_id)
        pool = self.pools.get(tag)
        batch = []
        if pool is not None or self._admits(owner.node_id):
            room = self.owner_quota - self._owner_frames(owner.node_id)
            room = (room - (POOL_FRAMES if pool is None else 0)) * PAGE_SIZE
            for i, blob in enumerate(blobs):
                if room > 0 and type(blob) is bytes and blob_fits(len(blob)):
                    batch.append(i)
                    room -= len(blob) + HEADER_SIZE * (1 if len(blob) <= MAX_BLOB else 2)
        if batch:
            if pool is None:
                pool = self.pools[tag] = self.cache.create_pool(PoolKind.PERSISTENT)
            else:  # a slot's old tail goes, whatever comes
                self._flush_tails(pool, [slots[i] for i in batch])
            made, wrapped = [], []
            for i in batch:
                blob = blobs[i]
                made.append(keys[i])
                wrapped.append(make_zpage(HEAD, slots[i], blob[:MAX_BLOB]))
                if len(blob) > MAX_BLOB:
                    made.append((TAIL, slots[i]))
                    wrapped.append(make_zpage(TAIL, slots[i], blob[MAX_BLOB:]))
            # intact: not checked again
            results = iter(self.cache.store_zpages(pool, wrapped, made))
            for i in batch:
                ok = not next(results).refused
                if len(blobs[i]) > MAX_BLOB:
                    tail_ok = not next(results).refused
                    if ok != tail_ok:  # half a blob is none: the half that was stored goes
                        self.cache.flush_page(pool, HEAD if ok else TAIL, slots[i])
                    ok = ok and tail_ok
                stored[i] = ok
            self._drop_if_empty(tag)
        self.refused += stored.count(False)
        self.moved += len(batch)
        return stored

    def _flush_tails(self, pool: int, slots: list[int]) -> None:
        if TAIL in self.cache.object_ids(pool):
            self.cache.flush_pages(pool, [(TAIL, slot) for slot in slots])

    def _tails(self, pool: int) -> int:
        """The tails a pool holds (no pages of their own), from its index, a chunk at a time."""
        cache = self.cache
        return sum(
            cache.page_states(pool, TAIL, c << CHUNK_BITS, (c + 1) << CHUNK_BITS).count(STORED)
            for c in cache.object_chunks(pool, TAIL)
        )

    def _admits(self, node_id: str) -> bool:
        """Whether `node_id` may start a pool: it holds pages already, or there is room for
        one more owner."""
        owners = self.owners()
        return node_id in owners or len(owners) < self.max_owners

    def _drop_if_empty(self, tag: PoolTag) -> None:
        pool = self.pools.get(tag)
        if pool is not None and not self.cache.pool_pages(pool):
            self.cache.destroy_pool(self.pools.pop(tag))

    def reclaim(self, owner: OwnerTag, epoch: int) -> list[tuple[int, int]]:
        """Move every page held for `owner.node_id` under its current incarnation and `epoch`;
        their (pool id, slot)."""
        for tag in [t for t in self.pools if t[0] == owner.node_id]:
            target = (owner.node_id, owner.incarnation, epoch, tag[3])
            if tag == target:
                continue
            source = self.pools.pop(tag)
            into = self.pools.get(target)
            if into is None:
                self.pools[target] = source
                continue
            keys = self.cache.keys(source)
            zpages = [z for z in self.cache.read_zpages(source, keys) if z is not None]
            self._flush_tails(into, [slot for oid, slot in keys if oid == HEAD])  # see put()
            self.cache.store_zpages(into, zpages)
            self.cache.destroy_pool(source)
        return [
            (tag[3], slot)
            for tag, pool in self.pools.items()
            if tag[0] == owner.node_id
            for oid, slot in self.cache.keys(pool)
            if oid == HEAD
        ]

    def get(
        self, owner: OwnerTag, epoch: int, pool_id: int, slots: list[int]
    ) -> list[bytes | None]:
        """The blobs held under `slots`, None where nothing is held."""
        keys = _keys(slots)
        pool = self.pools.get((owner.node_id, owner.incarnation, epoch, pool_id))
        if pool is None:
            return [None] * len(keys)
        self.moved += len(keys)
        blobs = [z[HEADER_SIZE:] if z else None for z in self.cache.read_zpages(pool, keys)]
        if TAIL in self.cache.object_ids(pool):
            heads = [i for i, blob in enumerate(blobs) if blob and len(blob) == MAX_BLOB]
            tails = self.cache.read_zpages(pool, [(TAIL, slots[i]) for i in heads])
            for i, tail in zip(heads, tails, strict=True):
                head = blobs[i]
                if head and tail:
                    blobs[i] = head + tail[HEADER_SIZE:]
        return blobs

    def flush(self, owner: OwnerTag, epoch: int, pool_id: int, slots: list[int]) -> int:
        keys = _keys(slots)
        tag = (owner.node_id, owner.incarnation, epoch, pool_id)
        pool = self.pools.get(tag)
        if pool is None:
            return 0
        gone = self.cache.flush_pages(pool, keys)
        self._flush_tails(pool, slots)
        self._drop_if_empty(tag)
        return gone

    @property
    def pages(self) -> int:
        return self.cache.stored_pages - sum(map(self._tails, self.pools.values()))

    def pages_by_owner(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tag, pool in self.pools.items():
            out[tag[0]] = out.get(tag[0], 0) + self.cache.pool_pages(pool) - self._tails(pool)
        return out

    def free_bytes_for(self, node_id: str) -> int:
        """Room left for one owner: the store's free room, capped by that owner's quota (none
        for a new owner once `max_owners` hold pages)."""
        if not self._admits(node_id):
            return 0
        free = self.capacity_frames - self.cache.frames
        quota = self.owner_quota - self._owner_frames(node_id)
        return max(0, min(free, quota)) * PAGE_SIZE

    def close(self) -> None:
        self.cache.close()
