# The pool registry: which pools a node has, kept in its data directory across restarts.
#
# A pool's identity is its id, kind, allocator, store-raw policy and owner (empty for a client's
# pool, "nbd:NAME" for the pool behind an NBD export).  Pages of persistent pools outlive the
# process (backing file, peers), so the pools they belong to must too: a node restarted on its
# data dir recreates every pool under its old id before it adopts the pages it finds.
#
# A persistent pool of a client may have lost pages in a crash (those it held in RAM alone), and a
# get that finds no page there must not say "never stored": after an unclean stop the node marks
# its clients' persistent pools lost (`{"lost": [ids]}`), their gets answer PAGE_STATUS_LOST for
# what they lack (node/servicer.py), and the mark stays, across restarts, until the pool's owner
# accepts the loss (`{"accept": id}`, the AcceptLoss RPC) or destroys the pool.  Coarse: which
# pages were lost is not known (a key ledger would cost a write per put), so every absent key of
# the pool answers LOST, a key never put included; an owner that knows what it put (as a kernel's
# frontswap map does) learns of each page it lost when it asks for it.
#
# The file (`data_dir/pools.log`) is an append-only log of JSON lines, `{"add": {...}}`,
# `{"remove": id}`, `{"lost": [ids]}` or `{"accept": id}`, each written with one write() and
# fsync'd before the RPC that caused it answers; a torn last line (a crash mid-write) is
# ignored.  On open the log is replayed and rewritten compactly (to a temporary file, then
# renamed), so it stays proportional to the live pools however many were created and destroyed;
# on a full disk it is kept as it is.
#
# Pool ids are unique across the cluster and across restarts, so a client that reaches another
# node, or this one restarted, with an old id gets NOT_FOUND, never another pool's pages.  An
# engine id (what the engine, the backing file and peers know, below 2**32) is a 16-bit tag
# drawn at random for this node (kept in the log) above a 16-bit counter that only goes up
# (kept too), so ids are never handed out twice by a node, even after their pool is destroyed;
# when the counter runs out, a new tag is drawn, never one this node used before.  Clients see
# the public id: a 31-bit salt drawn once per data directory (kept in the log) above the engine
# id, 63 bits in all.  Two nodes hand out the same public id only if they drew the same salt
# and the same tag and counter: about n**2 / 2**48 for n nodes, and even then ownership
# (node/tenants.py) keeps each tenant's pools its own.  Registries of older versions keep their
# ids (salt 0, and their tags count as used).
#
# Trade-off: an fsync per create/destroy (pools are created rarely; pages never touch this file).
from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Container
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.logs import log_event
from ramster.atomicfile import NO_SPACE, replace_file
from ramster.zcache import PoolKind, UnknownPool, ZCache

POOLS_FILE = "pools.log"
TAG_BITS = 16
TAGS = 1 << TAG_BITS  # tag 0 is the ids of registries from before tags
ENGINE_BITS = 32  # engine ids are below 2**32; the salt sits above them in public ids
SALTS = 1 << 31  # public ids stay below 2**63, safe for every client's integer type


@dataclass(frozen=True)
class PoolRecord:
    pool_id: int
    kind: PoolKind
    allocator: str
    store_raw: bool | None = None  # None: the engine's default
    owner: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolRecord:
        return cls(
            pool_id=int(data["pool_id"]),
            kind=PoolKind(data["kind"]),
            allocator=str(data["allocator"]),
            store_raw=data.get("store_raw"),
            owner=str(data.get("owner", "")),
        )


class PoolRegistryError(Exception):
    """The pool registry cannot be read or written; the message says why."""


class PoolRegistry:
    """The durable list of a node's pools (see the header)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / POOLS_FILE
        self.pools: dict[int, PoolRecord] = {}
        self.tag = 0  # this node's current id tag (0: none drawn yet)
        self.counter = 0  # the next id is tag << TAG_BITS | counter
        self.used_tags: set[int] = {0}
        self.lost: set[int] = set()  # pools that may have lost pages in a crash (see the header)
        self.torn = 0  # unreadable lines dropped on open
        self._fd = -1
        self.salt = self._replay()  # above the engine id in public ids
        self._compact()

    def _replay(self) -> int:
        """Read the log; the salt it keeps, a new one for a new registry, or 0 for a registry
        of an older version (its ids stay as they were)."""
        salt = 0
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return 1 + secrets.randbelow(SALTS - 1)
        except OSError as exc:
            raise PoolRegistryError(f"cannot read {self.path}: {exc.strerror}") from None
        for line in lines:
            try:
                entry = json.loads(line)
                if "add" in entry:
                    record = PoolRecord.from_json(entry["add"])
                    self.pools[record.pool_id] = record
                    self._used(record.pool_id + 1)
                elif "remove" in entry:
                    self.pools.pop(int(entry["remove"]), None)
                elif "lost" in entry:
                    self.lost.update(map(int, entry["lost"]))
                elif "accept" in entry:
                    self.lost.discard(int(entry["accept"]))
                elif "tag" in entry:
                    self.tag, self.counter = int(entry["tag"]), int(entry.get("counter", 0))
                    self.used_tags.update([self.tag, *map(int, entry.get("used", ()))])
                    salt = int(entry.get("salt", salt)) % SALTS
                elif "next_id" in entry:  # a registry from before tags
                    self._used(int(entry["next_id"]))
            except (ValueError, KeyError, TypeError):
                self.torn += 1
        return salt

    def _used(self, next_id: int) -> None:
        """Ids below `next_id` were handed out: the counter passes them (under the current
        tag), and the tags of older ids count as used."""
        tag = (next_id - 1) >> TAG_BITS
        if self.tag and tag == self.tag:
            self.counter = max(self.counter, next_id & (TAGS - 1) or TAGS)
        else:
            self.used_tags.update(range(tag + 1) if not self.tag else [tag])

    def _compact(self) -> None:
        """Rewrite the log compactly and open it for appending.  A log that cannot be
        rewritten (its disk is full: the backing file may have filled it) is kept as it is,
        as it says the same: a node must come back on its data to let clients free room."""
        state = {"tag": self.tag, "counter": self.counter, "used": sorted(self.used_tags)}
        state["salt"] = self.salt
        self.lost &= self.pools.keys()
        lines = [state] + [{"add": r.to_json()} for r in self.pools.values()]
        if self.lost:
            lines.append({"lost": sorted(self.lost)})
        try:
            try:
                replace_file(self.path, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
            except OSError as exc:
                if exc.errno not in NO_SPACE or not self.path.exists():
                    raise
                log_event(
                    "pools_log_not_compacted",
                    logging.WARNING,
                    path=str(self.path),
                    error=exc.strerror,
                )
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise PoolRegistryError(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, entry: dict[str, Any]) -> None:
        os.write(self._fd, json.dumps(entry).encode() + b"\n")
        os.fsync(self._fd)

    def add(self, record: PoolRecord) -> None:
        self._append({"add": record.to_json()})
        self.pools[record.pool_id] = record
        self._used(record.pool_id + 1)

    def new_id(self, taken: Container[int]) -> int:
        """An id never handed out by this node, nor in `taken`: tag << 16 | counter."""
        while True:
            if not self.tag or self.counter >= TAGS:
                self._draw_tag()
            pool_id = self.tag << TAG_BITS | self.counter
            self.counter += 1
            if pool_id not in taken and pool_id not in self.pools:
                return pool_id

    def _draw_tag(self) -> None:
        if len(self.used_tags) >= TAGS:
            raise PoolRegistryError("this node has used every pool id there is")
        tag = next(t for t in iter(lambda: secrets.randbelow(TAGS), -1) if t not in self.used_tags)
        self._append({"tag": tag, "counter": 0, "salt": self.salt})
        self.tag, self.counter = tag, 0
        self.used_tags.add(tag)

    def remove(self, pool_id: int) -> None:
        if self.pools.pop(pool_id, None) is not None:
            self._append({"remove": pool_id})
        self.lost.discard(pool_id)

    def mark_lost(self, pool_ids: list[int]) -> None:
        """The node crashed: these pools may have lost pages (in memory even if the log
        cannot say so: OSError, once the mark holds)."""
        self.lost.update(pool_ids)
        self._append({"lost": pool_ids})

    def accept_loss(self, pool_id: int) -> bool:
        """The pool's owner accepts its losses; whether it was marked."""
        if pool_id not in self.lost:
            return False
        self._append({"accept": pool_id})
        self.lost.discard(pool_id)
        return True

    def engine_pools(self) -> list[tuple[int, PoolKind, str, bool | None]]:
        """What the engine must recreate on start, as ZCache(pools=...) takes it."""
        return [(r.pool_id, r.kind, r.allocator, r.store_raw) for r in self.pools.values()]

    def by_owner(self, owner: str) -> PoolRecord | None:
        return next((r for r in self.pools.values() if r.owner == owner), None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Pools:
    """Create and destroy pools in the engine and the registry together."""

    def __init__(self, engine: ZCache, registry: PoolRegistry) -> None:
        self.engine = engine
        self.registry = registry

    def create(
        self,
        kind: PoolKind,
        allocator: str | None = None,
        store_raw: bool | None = None,
        owner: str = "",
    ) -> int:
        """A new pool, recorded before its id is handed out."""
        pool_id = self.registry.new_id(self.engine.pool_ids())
        allocator = allocator or self.engine.config.default_allocator
        self.engine.create_pool(kind, allocator, pool_id=pool_id, store_raw=store_raw)
        try:
            self.registry.add(PoolRecord(pool_id, kind, allocator, store_raw, owner))
        except OSError as exc:
            self.engine.destroy_pool(pool_id)
            raise PoolRegistryError(f"cannot record pool {pool_id}: {exc.strerror}") from None
        return pool_id

    def ensure(
        self,
        owner: str,
        kind: PoolKind = PoolKind.PERSISTENT,
        allocator: str | None = None,
        store_raw: bool | None = None,
    ) -> int:
        """The pool `owner` has (found again after a restart), else a new one for it."""
        record = self.registry.by_owner(owner)
        if record is not None:
            return record.pool_id
        return self.create(kind, allocator, store_raw, owner)

    def forget(self, pool_id: int) -> None:
        """The engine dropped `pool_id`: drop its record too."""
        self.registry.remove(pool_id)

    def lost(self, pool_id: int) -> bool:
        """Whether the pool may have lost pages in a crash (see the header)."""
        return pool_id in self.registry.lost

    def accept_loss(self, pool_id: int) -> bool:
        """The owner accepts the pool's losses: whether it was marked (OSError if the log
        cannot say so, and the mark stays)."""
        return self.registry.accept_loss(pool_id)

    def owner_of(self, pool_id: int) -> str | None:
        """Who owns a pool of the engine (a pool the registry lacks, adopted from the backing
        file, is the open tenant's); None for no such pool."""
        if not self.engine.has_pool(pool_id):
            return None
        record = self.registry.pools.get(pool_id)
        return record.owner if record else ""

    def public(self, pool_id: int) -> int:
        """The id clients know the engine's pool `pool_id` by (see the header)."""
        return self.registry.salt << ENGINE_BITS | pool_id

    def owned(self, public_id: int, owner: str) -> int:
        """The engine id of the pool clients call `public_id`, if `owner` owns it; else
        UnknownPool, word for word as if it did not exist (another node's id included)."""
        pool_id = public_id & ((1 << ENGINE_BITS) - 1)
        if public_id >> ENGINE_BITS != self.registry.salt or self.owner_of(pool_id) != owner:
            raise UnknownPool(f"no pool with id {public_id!r}")
        return pool_id

    def owned_by(self, owner: str) -> list[int]:
        return [p for p in self.engine.pool_ids() if self.owner_of(p) == owner]
