# Foreign pages: what this node holds in its RAM for its peers.
#
# They live in a zcache of their own, apart from the node's own pages, with its own limit (the
# foreign pool limit) and no evictor: a holder never writes a peer's page to its disk or passes it
# on; when full it refuses and the owner places the page elsewhere.  Each owner's pages are
# limited again to a share of that limit, so one noisy peer cannot take all of it.  Pages are kept
# in one zcache pool per (owner node, owner incarnation, epoch, owner pool), under the key their
# own header names, so they travel back byte for byte and the owner verifies them.  An owner back
# from a restart asks for its pages (`reclaim`): they move under its new incarnation and the epoch
# it names, and it learns their keys.  A new incarnation that puts without having asked (an owner
# that lost its data directory) drops the old one's pools.
from __future__ import annotations

from dataclasses import dataclass

from ramster.zcache import PoolKind, ZCache, ZCacheConfig
from ramster.zcache.codec import PAGE_SIZE, zpage_length

PoolTag = tuple[str, str, int, int]  # owner node id, owner incarnation, epoch, owner pool id


@dataclass(frozen=True)
class OwnerTag:
    node_id: str
    incarnation: str


class ForeignStore:
    def __init__(self, capacity_frames: int, owner_share: float = 0.5) -> None:
        if not 0 < owner_share <= 1:
            raise ValueError(f"owner_share must be in (0, 1], got {owner_share}")
        self.capacity_frames = capacity_frames
        self.owner_quota = max(1, int(capacity_frames * owner_share))
        self.cache = ZCache(ZCacheConfig(capacity_frames=capacity_frames))
        self.pools: dict[PoolTag, int] = {}
        self.refused = 0

    def _owner_frames(self, node_id: str) -> int:
        return sum(
            self.cache.pools[p].zalloc.frames + self.cache.pools[p].raw.frames
            for tag, p in self.pools.items()
            if tag[0] == node_id
        )

    def _forget_incarnations(self, owner: OwnerTag) -> None:
        for tag in [t for t in self.pools if t[0] == owner.node_id and t[1] != owner.incarnation]:
            self.cache.destroy_pool(self.pools.pop(tag))

    def put(self, owner: OwnerTag, epoch: int, pool_id: int, zpages: list[bytes]) -> list[bool]:
        """Store an owner's zpages; per zpage whether it was taken."""
        self._forget_incarnations(owner)
        tag = (owner.node_id, owner.incarnation, epoch, pool_id)
        intact = [type(z) is bytes and 0 < zpage_length(z) == len(z) for z in zpages]
        stored = [False] * len(zpages)
        room = (self.owner_quota - self._owner_frames(owner.node_id)) * PAGE_SIZE
        batch = []
        for i, (zpage, ok) in enumerate(zip(zpages, intact, strict=True)):
            if ok and room > 0:
                batch.append(i)
                room -= len(zpage)
        if batch:
            pool = self.pools.get(tag)
            if pool is None:
                pool = self.pools[tag] = self.cache.create_pool(PoolKind.PERSISTENT)
            results = self.cache.store_zpages(pool, [zpages[i] for i in batch])
            for i, result in zip(batch, results, strict=True):
                stored[i] = not result.refused
        self.refused += stored.count(False)
        return stored

    def reclaim(self, owner: OwnerTag, epoch: int) -> list[tuple[int, int, int]]:
        """Move every page held for `owner.node_id` under its current incarnation and `epoch`;
        their (pool id, oid, index) keys."""
        for tag in [t for t in self.pools if t[0] == owner.node_id]:
            target = (owner.node_id, owner.incarnation, epoch, tag[3])
            if tag == target:
                continue
            source = self.pools.pop(tag)
            into = self.pools.get(target)
            if into is None:
                self.pools[target] = source
                continue
            keys = [(oid, index) for oid, index, _ in self.cache.pools[source].index.items()]
            zpages = [z for z in self.cache.read_zpages(source, keys) if z is not None]
            self.cache.store_zpages(into, zpages)
            self.cache.destroy_pool(source)
        return [
            (tag[3], oid, index)
            for tag, pool in self.pools.items()
            if tag[0] == owner.node_id
            for oid, index, _ in self.cache.pools[pool].index.items()
        ]

    def get(
        self, owner: OwnerTag, epoch: int, pool_id: int, keys: list[tuple[int, int]]
    ) -> list[bytes | None]:
        pool = self.pools.get((owner.node_id, owner.incarnation, epoch, pool_id))
        if pool is None:
            return [None] * len(keys)
        return self.cache.read_zpages(pool, keys)

    def flush(self, owner: OwnerTag, epoch: int, pool_id: int, keys: list[tuple[int, int]]) -> int:
        tag = (owner.node_id, owner.incarnation, epoch, pool_id)
        pool = self.pools.get(tag)
        if pool is None:
            return 0
        gone = sum(self.cache.flush_page(pool, oid, index) for oid, index in keys)
        if not self.cache.pools[pool].index.count:
            self.cache.destroy_pool(self.pools.pop(tag))
        return gone

    @property
    def pages(self) -> int:
        return self.cache.stored_pages

    def pages_by_owner(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tag, pool in self.pools.items():
            out[tag[0]] = out.get(tag[0], 0) + self.cache.pools[pool].index.count
        return out

    def free_bytes_for(self, node_id: str) -> int:
        """Room left for one owner: the store's free room, capped by that owner's quota."""
        free = self.capacity_frames - self.cache.frames
        quota = self.owner_quota - self._owner_frames(node_id)
        return max(0, min(free, quota)) * PAGE_SIZE

    def close(self) -> None:
        self.cache.close()
