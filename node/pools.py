# The pool registry: which pools a node has, kept in its data directory across restarts.
#
# A pool's identity is its id, kind, allocator, store-raw policy and owner (empty for a client's
# pool, "nbd:NAME" for the pool behind an NBD export).  Pages of persistent pools outlive the
# process (backing file, peers), so the pools they belong to must too: a node restarted on its
# data dir recreates every pool under its old id before it adopts the pages it finds.
#
# The file (`data_dir/pools.log`) is an append-only log of JSON lines, `{"add": {...}}` or
# `{"remove": id}`, each written with one write() and fsync'd before the RPC that caused it
# answers; a torn last line (a crash mid-write) is ignored.  On open the log is replayed and
# rewritten compactly (to a temporary file, then renamed), so it stays proportional to the live
# pools however many were created and destroyed.  It also records the highest id ever used, so
# an id is never handed out twice, even after its pool is destroyed.
#
# Trade-off: an fsync per create/destroy (pools are created rarely; pages never touch this file).
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ramster.zcache import PoolKind, ZCache

POOLS_FILE = "pools.log"


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
        self.next_id = 0
        self.torn = 0  # unreadable lines dropped on open
        self._fd = -1
        self._replay()
        self._compact()

    def _replay(self) -> None:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PoolRegistryError(f"cannot read {self.path}: {exc.strerror}") from None
        for line in lines:
            try:
                entry = json.loads(line)
                if "add" in entry:
                    record = PoolRecord.from_json(entry["add"])
                    self.pools[record.pool_id] = record
                    self.next_id = max(self.next_id, record.pool_id + 1)
                elif "remove" in entry:
                    self.pools.pop(int(entry["remove"]), None)
                elif "next_id" in entry:
                    self.next_id = max(self.next_id, int(entry["next_id"]))
            except (ValueError, KeyError, TypeError):
                self.torn += 1

    def _compact(self) -> None:
        lines = [{"next_id": self.next_id}] + [{"add": r.to_json()} for r in self.pools.values()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise PoolRegistryError(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, entry: dict[str, Any]) -> None:
        os.write(self._fd, json.dumps(entry).encode() + b"\n")
        os.fsync(self._fd)

    def add(self, record: PoolRecord) -> None:
        self._append({"add": record.to_json()})
        self.pools[record.pool_id] = record
        self.next_id = max(self.next_id, record.pool_id + 1)

    def remove(self, pool_id: int) -> None:
        if self.pools.pop(pool_id, None) is not None:
            self._append({"remove": pool_id})

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
        pool_id = max(self.engine.next_pool_id, self.registry.next_id)
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
