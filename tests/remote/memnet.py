# An in-memory network of nodes for the ramster layer's policy tests: each node has the real
# zcache, backing file, layer, foreign store and driver; only the transport is a function call.
# Nodes can be killed (unreachable, memory gone), frozen (calls hang until the deadline),
# restarted (new incarnation, empty), made to corrupt what they return, or start leaving; links
# can be cut (a partition: both ends alive, each unreachable to the other); new nodes join from
# seed names, learning the rest as real nodes do (heartbeats name their sender, replies list
# members).
from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from pathlib import Path

from node.driver import RemoteDriver
from ramster.remote import ForeignStore, OwnerTag, RamsterLayer, RemoteConfig
from ramster.remote.events import FlushItem, Joined, Leaving
from ramster.remote.journal import Journal
from ramster.remote.membership import PeerInfo
from ramster.remote.table import slot_of
from ramster.zcache import PoolKind, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile
from ramster.zcache.evictor import EvictorChain

DEADLINE = 0.2


class MemNode:
    def __init__(
        self,
        net: MemNetwork,
        name: str,
        limit_frames: int,
        foreign_frames: int,
        tmp: Path,
        seeds: list[str],
    ) -> None:
        self.net = net
        self.name = name
        self.seeds = seeds
        self.tmp = tmp / name
        self.tmp.mkdir(exist_ok=True)
        self.limit_frames = limit_frames
        self.up = True
        self.frozen = False
        self.corrupt = False
        self.leaving = False
        self.foreign = ForeignStore(foreign_frames)
        self._boot(pools=())

    def _boot(self, pools: list[tuple[int, PoolKind, str, bool | None]] | tuple[()]) -> None:
        """Start the owner's side on its data directory (a journal, a backing file)."""
        self.incarnation = uuid.uuid4().hex
        self.backing = BackingFile(self.tmp / "backing.dat")
        self.layer = RamsterLayer(
            self.name,
            self.incarnation,
            self.seeds,
            self.net.config,
            local=self.backing,
            seed=7,
            journal=Journal(self.tmp),
        )
        self.chain = EvictorChain([self.layer, self.backing])
        self.cache = ZCache(
            ZCacheConfig(pool_limit_frames=self.limit_frames), evictor=self.chain, pools=pools
        )
        self.driver = RemoteDriver(
            self.layer,
            MemTransport(self.net, self),
            lambda pool, keys: self.chain.held_by(
                self.layer, self.cache.evicted_locations(pool, keys)
            ),
            clock=lambda: self.net.now,
        )

    def remote_locations(self, pool: int, keys: list[tuple[int, int]]) -> list[int]:
        return self.chain.held_by(self.layer, self.cache.evicted_locations(pool, keys))

    def restart_owner(self, graceful: bool) -> None:
        """The owner's process ends (gracefully: pages in RAM written back, journal saved; or
        killed: RAM and outbox gone) and starts again on the same data directory; what it
        holds for others is gone either way."""
        pools = [(p.id, p.kind, p.allocator, p.store_raw) for p in self.cache.snapshot().pools]
        if graceful:
            self.layer.handle(Leaving())
            self.cache.write_back_all()
            self.layer.close()
            self.backing.close()
        else:
            self.layer.journal.close()  # type: ignore[union-attr]  # the kernel keeps what was written
            os.close(self.backing.fd)
        self.foreign = ForeignStore(self.foreign.capacity_frames)
        self._boot(pools)

    @property
    def owner(self) -> OwnerTag:
        return OwnerTag(self.name, self.incarnation)

    def restart_empty(self) -> None:
        """A new process on the same address: new incarnation, nothing held."""
        self.incarnation = uuid.uuid4().hex
        self.foreign.close()
        self.foreign = ForeignStore(self.foreign.capacity_frames)


def _open(location: int, blob: bytes) -> bytes:
    """The zpage of `blob` if it is the copy of `location`, else b"" (damaged)."""
    return blob[8:] if blob[:8] == location.to_bytes(8, "little") else b""


class MemTransport:
    def __init__(self, net: MemNetwork, me: MemNode) -> None:
        self.net = net
        self.me = me
        self.calls: Counter[tuple[str, str]] = Counter()  # (method, address) -> calls made
        self.seals = 0  # zpages sealed

    async def _reach(self, address: str, method: str) -> MemNode:
        self.calls[method, address] += 1
        node = self.net.nodes[address]
        if not node.up or frozenset((self.me.name, address)) in self.net.cut:
            raise ConnectionError(f"{address} is unreachable")
        if node.frozen:
            await asyncio.sleep(DEADLINE)
            raise TimeoutError(f"{address} did not answer in time")
        return node

    async def heartbeat(self, address: str, verify: bool = True) -> PeerInfo:
        node = await self._reach(address, "heartbeat")
        node.layer.handle(Joined((self.me.name,), self.net.now))
        free = node.foreign.free_bytes_for(self.me.name)
        members = tuple(node.layer.membership.gossip())
        return PeerInfo(node.name, node.incarnation, free, node.leaving, node.name, members)

    def seal(self, pool_id: int, location: int, zpage: bytes) -> bytes:
        """What the real transport's sealing does for versions: the blob names its location."""
        self.seals += 1
        return location.to_bytes(8, "little") + zpage

    async def put(
        self, address: str, epoch: int, pool_id: int, blobs: list[bytes], locations: list[int]
    ) -> list[bool]:
        node = await self._reach(address, "put")
        slots = [slot_of(location) for location in locations]
        return node.foreign.put(self.me.owner, epoch, pool_id, slots, blobs)

    async def get(
        self, address: str, epoch: int, pool_id: int, locations: list[int]
    ) -> list[bytes | None]:
        node = await self._reach(address, "get")
        slots = [slot_of(location) for location in locations]
        got = node.foreign.get(self.me.owner, epoch, pool_id, slots)
        zpages = [_open(loc, b) if b else None for loc, b in zip(locations, got, strict=True)]
        if node.corrupt:  # a flipped bit: the real transport's seal fails to open it
            zpages = [b"" if z else z for z in zpages]
        return zpages

    async def flush(self, address: str, items: tuple[FlushItem, ...]) -> None:
        node = await self._reach(address, "flush")
        for epoch, pool_id, slot in items:
            node.foreign.flush(self.me.owner, epoch, pool_id, [slot])

    async def reclaim(self, address: str, epoch: int) -> set[tuple[int, int]]:
        node = await self._reach(address, "reclaim")
        return set(node.foreign.reclaim(self.me.owner, epoch))


class MemNetwork:
    def __init__(
        self,
        tmp: Path,
        names: list[str],
        limit_frames: int = 40,
        foreign_frames: int = 4000,
        config: RemoteConfig | None = None,
    ) -> None:
        self.config = config or RemoteConfig(heartbeat_interval=1.0, down_after=3.0)
        self.now = 0.0
        self.tmp = tmp
        self.limit_frames, self.foreign_frames = limit_frames, foreign_frames
        self.cut: set[frozenset[str]] = set()  # links that carry nothing, both ways
        self.nodes: dict[str, MemNode] = {}
        for name in names:
            self.join(name, names)

    def join(self, name: str, seeds: list[str]) -> MemNode:
        """Start node `name` knowing only `seeds`."""
        node = MemNode(self, name, self.limit_frames, self.foreign_frames, self.tmp, seeds)
        self.nodes[name] = node
        return node

    async def settle(self, rounds: int = 3, advance: float = 1.0) -> None:
        for _ in range(rounds):
            self.now += advance
            for node in list(self.nodes.values()):
                if node.up and not node.frozen:
                    await node.driver.round()

    def live_pool(self, name: str) -> tuple[MemNode, int]:
        node = self.nodes[name]
        return node, node.cache.create_pool(PoolKind.PERSISTENT)
