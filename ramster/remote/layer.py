# The ramster layer on the owner's side: an evictor that parks zpages in peers' RAM.
#
# zcache's reaper calls `evict()` synchronously; the zpages are accepted into an outbox (bounded;
# beyond it, or with no peer up, evict refuses and the next evictor, the backing file, takes
# them) and get a *location*, an id in this layer's table.  The node drains the outbox
# asynchronously: `take_sends()` says which zpages go to which peer, and `sent()` reports per
# zpage whether the peer stored it.  Each zpage wants `replicas` copies: on distinct peers when
# enough have room, else on the peers there are plus the local backing file.  Until it has them
# the zpage stays in the entry, so a get is served locally and nothing is ever lost to a refusal
# or a dead peer: it is placed again elsewhere, and failing every peer it goes to disk.
#
# A get of a remote page needs I/O, so the node asks `fetch_sources()` for the holders (live ones
# first), fetches and verifies the zpage, `stage()`s it, and then zcache's `load()` finds it
# here; with no holder reachable the disk copy serves, if any.  `forget()` (flush, overwrite,
# promotion home) queues flushes for every holder, sent by the node with `take_flushes()` and
# retried until the holder takes them.  When a peer goes down, restarts or announces it is
# leaving, every zpage it held is queued for repair: the node fetches a surviving copy
# (`take_repairs()`, `repaired()`) and it is placed again like a new one.  A peer marked down is
# not forgotten: if it was only slow or cut off, it comes back with its copies, which then count
# again (extra ones are flushed), and a page whose only reachable copy is on it waits for it
# instead of being declared lost.  Only a restart (a new incarnation) loses what a peer held.
#
# Durability: with a `Journal`, every copy that comes to exist (a peer's stored reply, a disk
# write) and every location forgotten is recorded in the data directory, so a restarted owner
# rebuilds its table and zcache adopts the pages under their old keys (`recovered()`).  A peer
# is used again only once *synced*: the owner has asked it (`Reclaim`) what it still keeps and
# `reclaimed()` has matched that with the table, dropping copies it lost and flushing what the
# table does not know, so no orphan outlives the owner's recovery.  `close()` (graceful stop)
# writes what is still in the outbox to disk and compacts the journal.
#
# Bounds: the outbox (zpages whose bytes wait here for copies) is limited in pages and bytes;
# beyond it evict() refuses and the backing file takes the zpages, and repairs are fetched only
# while the outbox has room for them.  `wake` (set by the driver) is called whenever work is
# queued, so nothing waits for a timer.
#
# Trade-off: the table keeps one small object per remote page on the owner (the page's bytes
# live elsewhere); compact arrays as in zcache's index would be the next step at very large scale.
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ramster.remote.config import RemoteConfig
from ramster.remote.journal import Journal, Recovered
from ramster.remote.membership import Membership, PeerEvent
from ramster.zcache.codec import zpage_key
from ramster.zcache.errors import CorruptPage, PageUnavailable
from ramster.zcache.evictor import Evictor

NOBODY: frozenset[str] = frozenset()
STAGED_LIMIT = 4096  # fetched copies kept for gets (about 6 MiB at a 3x ratio)


class LocalDisk(Evictor, Protocol):
    """The local backing file, as the layer uses it for its own disk copies."""

    def claim(self, pool_id: int, location: int, oid: int, index: int) -> bool:
        """Take a record found on open as the layer's own (zcache must not adopt it)."""
        ...


class Entry:
    """One remotified zpage: where its copies are, and its bytes while it has too few."""

    __slots__ = (
        "allocator",
        "damaged",
        "disk",
        "holders",
        "index",
        "journaled",
        "oid",
        "pool_id",
        "sending",
        "tried",
        "zpage",
    )

    def __init__(
        self, pool_id: int, allocator: str, oid: int, index: int, zpage: bytes | None
    ) -> None:
        self.pool_id = pool_id
        self.allocator = allocator
        self.oid, self.index = oid, index
        self.zpage = zpage
        self.holders: dict[str, int] = {}  # peer address -> epoch the copy was placed in
        # peers a copy is in flight to, that refused one, whose copy failed verification: empty
        # for nearly every entry, so they share one empty frozenset until they are not
        self.sending = self.tried = self.damaged = NOBODY
        self.disk = 0  # location in the local backing file, 0 if none
        self.journaled = False  # its key is in the journal


@dataclass(frozen=True)
class SendPlan:
    """zpages for one peer: (location, pool id, zpage) each, all in the same epoch."""

    address: str
    epoch: int
    items: list[tuple[int, int, bytes]]


@dataclass(frozen=True)
class FetchSource:
    """Where a remote copy can be fetched: the peer and the foreign pool it was placed in."""

    address: str
    epoch: int
    pool_id: int
    oid: int
    index: int


@dataclass
class LayerStats:
    remote_puts: int = 0  # zpages stored by peers
    remote_refused: int = 0  # zpages a peer refused or failed to take
    remote_gets: int = 0  # zpages fetched from peers for gets
    remote_flushes: int = 0  # flushes delivered to peers
    disk_copies: int = 0  # copies written to the local backing file by this layer
    rereplicated: int = 0  # zpages placed again after a holder went
    lost: int = 0  # zpages with no copy left anywhere (should stay 0)
    damaged: int = 0  # copies a holder returned that failed verification
    outbox_refused: int = 0  # zpages evict() refused (outbox full or no peer up)
    repairs_pending: int = field(default=0)
    recovered: int = 0  # locations found again in the journal at start
    reclaimed: int = 0  # copies peers still held for us when asked after a restart
    orphans_flushed: int = 0  # copies peers held that the table did not know


class RamsterLayer:
    def __init__(
        self,
        node_id: str,
        incarnation: str,
        peers: list[str],
        config: RemoteConfig | None = None,
        local: LocalDisk | None = None,
        seed: int | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.config = config or RemoteConfig()
        self.membership = Membership(node_id, incarnation, peers, self.config.down_after, seed)
        self.local = local
        self.journal = journal
        self.stats = LayerStats()
        self.entries: dict[int, Entry] = {}
        self.by_peer: dict[str, set[int]] = {}
        self._next = 1
        self._pending: deque[int] = deque()  # locations that need a copy placed
        self._repairs: deque[int] = deque()  # locations whose bytes must be fetched back first
        self._flushes: dict[str, list[tuple[int, int, int, int]]] = {}  # epoch, pool, oid, index
        self._staged: dict[int, bytes] = {}
        self._short: set[int] = set()  # settled with fewer copies than wanted
        self._short_tried = 0.0
        self.outbox = 0  # entries holding their bytes
        self.outbox_bytes = 0
        self.closing = False  # set at a graceful stop: evict() refuses, the disk takes all
        self.wake: Callable[[], None] = lambda: None  # the driver's: work was queued
        if journal is not None:  # ask every peer what it holds for us before using it
            for peer in self.membership.peers.values():
                peer.synced = False
            self._recover(journal)

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self, journal: Journal) -> None:
        """Rebuild the table from the journal: copies on configured peers, disk copies the
        backing file still has.  A location left with neither is lost (its other copy was in
        RAM); peers are asked what they still hold once they answer (`reclaimed`)."""
        peers = self.membership.peers
        for location, rec in journal.recovered.items():
            disk = rec.disk
            if disk and not (
                self.local and self.local.claim(rec.pool_id, disk, rec.oid, rec.index)
            ):
                disk = 0
                journal.disk(location, 0)
            holders = {a: peers[a].epoch for a in rec.holders if a in peers}
            if not holders and not disk:
                self.stats.lost += 1
                journal.forget(location)
                continue
            entry = Entry(rec.pool_id, rec.allocator, rec.oid, rec.index, None)
            entry.holders, entry.disk, entry.journaled = holders, disk, True
            self.entries[location] = entry
            for address in holders:
                self.by_peer.setdefault(address, set()).add(location)
            self._next = max(self._next, location + 1)
        journal.commit()
        self.stats.recovered = len(self.entries)

    def _compact_journal(self) -> None:
        if self.journal is None:
            return
        self.journal.rewrite(
            {
                loc: Recovered(e.pool_id, e.allocator, e.oid, e.index, set(e.holders), e.disk)
                for loc, e in self.entries.items()
                if e.journaled
            }
        )

    def reclaimed(self, address: str, keys: set[tuple[int, int, int]]) -> None:
        """What `address` still holds for us, asked once after our start: copies the table
        expects there but the peer lost are dropped (and repaired); copies the table does not
        know are flushed.  From now on the peer is used."""
        peer = self.membership.peers.get(address)
        if peer is None:
            return
        lost = set()
        for location in self.by_peer.get(address, set()):
            entry = self.entries[location]
            key = (entry.pool_id, entry.oid, entry.index)
            if key in keys:
                keys.discard(key)
                self.stats.reclaimed += 1
            else:
                lost.add(location)
        for location in lost:
            self._drop_holder(location, address, flush=False)
        for pool_id, oid, index in keys:
            self._flushes.setdefault(address, []).append((peer.epoch, pool_id, oid, index))
        self.stats.orphans_flushed += len(keys)
        self._commit()
        peer.synced = True
        # what it holds and what has no peer copy at all (saved to disk at our stop) may be
        # short of copies: now there is a peer to place them on
        alone = {loc for loc, e in self.entries.items() if not e.holders}
        self._queue_repairs(lost | alone | self.by_peer.get(address, set()))
        self._retry_short()

    # -- membership -------------------------------------------------------------------------
    def heard(
        self, address: str, node_id: str, incarnation: str, free: int, leaving: bool, now: float
    ) -> list[PeerEvent]:
        events = self.membership.heard(address, node_id, incarnation, free, leaving, now)
        for event in events:
            if event is PeerEvent.RESTARTED:
                self._lose(address)
            elif event is PeerEvent.LEAVING:
                self._queue_repairs(self.by_peer.get(address, set()))
            elif event is PeerEvent.UP:
                self._rejoined(address)
            if event in (PeerEvent.RESTARTED, PeerEvent.UP):
                self._retry_short()
        return events

    def _retry_short(self) -> None:
        """A peer (re)appeared: zpages settled short of copies may get them now."""
        short, self._short = self._short, set()
        self._queue_repairs({loc for loc in short if loc in self.entries})

    def expire(self, now: float) -> list[str]:
        """Mark silent peers down and queue repairs of what they held; their addresses.
        Their copies are not forgotten: a peer that was only slow or cut off comes back with
        them, and until then they are the last resort of a page whose other copies are gone."""
        down = self.membership.expire(now)
        for address in down:
            self._queue_repairs(self.by_peer.get(address, set()))
        if self._short and now - self._short_tried > self.config.down_after:
            self._short_tried = now  # a slow retry, in case a peer got room since
            self._retry_short()
        return down

    def _rejoined(self, address: str) -> None:
        """A peer answers again, same process: its copies count again.  Where that makes more
        copies than wanted, its copy is flushed; where copies are still missing, repair."""
        for location in list(self.by_peer.get(address, ())):
            entry = self.entries[location]
            need = self._needed(entry)
            if need < 0:
                self._drop_holder(location, address, flush=True)
            elif need > 0:
                self._queue_repairs({location})
        self._commit()

    def _lose(self, address: str) -> None:
        """`address` restarted: what it held is gone."""
        self._flushes.pop(address, None)
        held = self.by_peer.get(address, set()).copy()
        for location in held:
            self._drop_holder(location, address, flush=False)
        self._commit()
        self._queue_repairs(held)

    def _drop_holder(self, location: int, address: str, flush: bool) -> None:
        entry = self.entries[location]
        epoch = entry.holders.pop(address, None)
        self.by_peer.get(address, set()).discard(location)
        if epoch is not None and flush:
            self._flushes.setdefault(address, []).append(
                (epoch, entry.pool_id, entry.oid, entry.index)
            )
        if self.journal is not None and entry.journaled:
            self.journal.drop(location, address)

    def _queue_repairs(self, locations: set[int]) -> None:
        for location in locations:
            entry = self.entries[location]
            if self._needed(entry) > 0:
                if entry.zpage is not None:
                    self._pending.append(location)
                else:
                    self._repairs.append(location)
        self.stats.repairs_pending = len(self._repairs)
        if locations:
            self.wake()

    def _needed(self, entry: Entry) -> int:
        peers = self.membership.peers
        good = sum(1 for a in entry.holders if a in peers and peers[a].up and not peers[a].leaving)
        return self.config.replicas - good - (1 if entry.disk else 0) - len(entry.sending)

    # -- evictor interface ------------------------------------------------------------------
    def _outbox_room(self) -> int:
        if self.outbox_bytes >= self.config.outbox_limit_bytes:
            return 0
        return self.config.outbox_limit - self.outbox

    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        room = self._outbox_room()
        if self.closing or room <= 0 or self.membership.choose(set()) is None:
            self.stats.outbox_refused += len(zpages)
            return [0] * len(zpages)
        out = []
        for zpage in zpages:
            if room <= 0:
                out.append(0)
                self.stats.outbox_refused += 1
                continue
            location = self._next
            self._next += 1
            self.entries[location] = Entry(pool_id, allocator, *zpage_key(zpage), zpage)
            self._pending.append(location)
            self.outbox += 1
            self.outbox_bytes += len(zpage)
            room -= 1
            out.append(location)
        self.wake()
        return out

    def load(self, pool_id: int, location: int) -> bytes:
        entry = self.entries.get(location)
        if entry is None:
            raise PageUnavailable(f"remote location {location} is unknown")
        if entry.zpage is not None:
            return entry.zpage
        staged = self._staged.get(location)
        if staged is not None:
            return staged
        if entry.disk and self.local is not None:
            try:
                return self.local.load(pool_id, entry.disk)
            except CorruptPage:
                if not entry.holders:
                    raise
                self._drop_disk(location, entry)  # the next get fetches a peer's copy
                self._queue_repairs({location})
                raise PageUnavailable(
                    f"the disk copy of remote location {location} is damaged"
                ) from None
        if entry.damaged and entry.damaged >= set(entry.holders):
            raise CorruptPage(f"every copy of remote location {location} failed verification")
        raise PageUnavailable(f"no copy of remote location {location} could be reached")

    def forget(self, pool_id: int, location: int) -> None:
        entry = self.entries.pop(location, None)
        if entry is None:
            return
        self._staged.pop(location, None)
        self._short.discard(location)
        for address, epoch in entry.holders.items():
            self.by_peer.get(address, set()).discard(location)
            self._flushes.setdefault(address, []).append(
                (epoch, entry.pool_id, entry.oid, entry.index)
            )
        if entry.disk and self.local is not None:
            self.local.forget(pool_id, entry.disk)
        if entry.zpage is not None:
            self._unbox(entry)
        if self.journal is not None and entry.journaled:
            self.journal.forget(location)
            self._commit()  # before the caller answers: a flushed page never comes back
        if entry.holders:
            self.wake()

    def recovered(self) -> Iterator[tuple[int, str, int, int, int]]:
        """The locations found again in the journal, for zcache to file under their keys."""
        for location, e in self.entries.items():
            yield e.pool_id, e.allocator, e.oid, e.index, location

    def _unbox(self, entry: Entry) -> None:
        assert entry.zpage is not None
        self.outbox -= 1
        self.outbox_bytes -= len(entry.zpage)
        entry.zpage = None

    def _commit(self) -> None:
        if self.journal is not None:
            self.journal.commit()
            if self.journal.wants_rewrite(3 * len(self.entries)):
                self._compact_journal()

    def _journal_key(self, location: int, entry: Entry) -> None:
        if self.journal is not None and not entry.journaled:
            self.journal.key(location, entry.pool_id, entry.allocator, entry.oid, entry.index)
            entry.journaled = True

    # -- sending ----------------------------------------------------------------------------
    def take_sends(self, limit: int | None = None) -> list[SendPlan]:
        """Assign pending zpages to peers (at most `limit` zpages); one plan per peer."""
        budget = limit or self.config.send_batch * 4
        plans: dict[str, list[tuple[int, int, bytes]]] = {}
        defer = []
        while self._pending and budget > 0:
            location = self._pending.popleft()
            entry = self.entries.get(location)
            if entry is None or entry.zpage is None:
                continue
            need = self._needed(entry)
            exclude = set(entry.holders) | entry.sending | entry.tried
            while need > 0:
                peer = self.membership.choose(exclude)
                if peer is None:
                    break
                exclude.add(peer.address)
                entry.sending |= {peer.address}
                self.membership.debit(peer.address, len(entry.zpage))
                plans.setdefault(peer.address, []).append((location, entry.pool_id, entry.zpage))
                budget -= 1
                need -= 1
            if need > 0 and not entry.sending:
                if not self._settle_without_peers(location, entry):
                    defer.append(location)
            elif not entry.sending:
                self._settle(entry)
        self._pending.extend(defer)
        self._commit()
        peers = self.membership.peers
        return [SendPlan(a, peers[a].epoch, items) for a, items in plans.items()]

    def _settle_without_peers(self, location: int, entry: Entry) -> bool:
        """No (more) peer can take a copy: add a disk copy; settle if a copy exists anywhere."""
        self._disk_copy(location, entry)
        if entry.disk or entry.holders:
            self._settle(entry)
            if self._needed(entry) > 0:  # placed again when a peer (re)appears
                self._short.add(location)
            return True
        entry.tried = NOBODY  # nothing took it: keep the bytes and try every peer again later
        return False

    def _disk_copy(self, location: int, entry: Entry) -> None:
        assert entry.zpage is not None
        if entry.disk or self.local is None:
            return
        (disk,) = self.local.evict(entry.pool_id, entry.allocator, [entry.zpage])
        if disk:
            entry.disk = disk
            self.stats.disk_copies += 1
            self._journal_key(location, entry)
            if self.journal is not None:
                self.journal.disk(location, disk)

    def _drop_disk(self, location: int, entry: Entry) -> None:
        if self.local is not None:
            self.local.forget(entry.pool_id, entry.disk)
        entry.disk = 0
        if self.journal is not None and entry.journaled:
            self.journal.disk(location, 0)

    def _settle(self, entry: Entry) -> None:
        if entry.zpage is not None:
            self._unbox(entry)
        entry.tried = NOBODY

    def sent(self, plan: SendPlan, stored: list[bool]) -> None:
        """What the peer did with each zpage of `plan` (all False if the call failed)."""
        for (location, pool_id, zpage), ok in zip(plan.items, stored, strict=True):
            entry = self.entries.get(location)
            if entry is None:  # forgotten while in flight: take back what the peer stored
                if ok:
                    oid, index = zpage_key(zpage)
                    self._flushes.setdefault(plan.address, []).append(
                        (plan.epoch, pool_id, oid, index)
                    )
                continue
            entry.sending = entry.sending - {plan.address} or NOBODY
            peer = self.membership.peers.get(plan.address)
            if ok and peer is not None and peer.epoch == plan.epoch:
                entry.holders[plan.address] = plan.epoch
                entry.damaged = entry.damaged - {plan.address} or NOBODY
                self.by_peer.setdefault(plan.address, set()).add(location)
                self.stats.remote_puts += 1
                self._journal_key(location, entry)
                if self.journal is not None:
                    self.journal.holder(location, plan.address)
            else:
                entry.tried |= {plan.address}
                self.stats.remote_refused += 1
            self._pending.append(location)  # take_sends settles it or places more copies
        self._commit()

    # -- gets -------------------------------------------------------------------------------
    def fetch_sources(self, location: int) -> list[FetchSource]:
        """Peers to fetch a remote copy from: live, synced ones, suspects last; empty when no
        fetch is needed (a local disk copy is read instead: faster than any peer)."""
        entry = self.entries.get(location)
        if entry is None or entry.zpage is not None or entry.disk or location in self._staged:
            return []  # no fetch needed: the bytes are here, or on the local disk
        peers = self.membership.peers
        live = [
            (a, epoch)
            for a, epoch in entry.holders.items()
            if a in peers and peers[a].up and peers[a].synced
        ]
        live.sort(key=lambda holder: peers[holder[0]].suspect)
        return [FetchSource(a, epoch, entry.pool_id, entry.oid, entry.index) for a, epoch in live]

    def stage(self, location: int, zpage: bytes) -> None:
        """A fetched, verified copy for the get that is about to load `location`.  It stays
        (bounded, oldest out first) until the location is forgotten, so a get that runs
        concurrently with another of the same page, or one that could not bring it home,
        finds it too."""
        if location in self.entries:
            self._staged[location] = zpage
            while len(self._staged) > STAGED_LIMIT:  # the oldest copies go first
                del self._staged[next(iter(self._staged))]
            self.stats.remote_gets += 1

    def damaged(self, location: int, address: str) -> None:
        """`address` returned a copy of `location` that failed verification."""
        entry = self.entries.get(location)
        self.stats.damaged += 1
        if entry is not None and address in entry.holders:
            entry.damaged |= {address}

    # -- flushes ----------------------------------------------------------------------------
    def take_flushes(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """Flushes owed to reachable peers: address -> [(epoch, pool id, oid, index)].  Those
        owed to a peer that is down or failed a call since it last answered wait for it."""
        peers = self.membership.peers
        out = {
            a: f
            for a, f in self._flushes.items()
            if a in peers and peers[a].up and peers[a].synced and not peers[a].suspect
        }
        for address in out:
            del self._flushes[address]
        return out

    def flushed(self, address: str, items: list[tuple[int, int, int, int]], ok: bool) -> None:
        if ok:
            self.stats.remote_flushes += len(items)
        else:
            self.membership.failed(address)  # retried once it answers a heartbeat again
            self._flushes.setdefault(address, []).extend(items)

    @property
    def flushes_pending(self) -> int:
        return sum(len(f) for f in self._flushes.values())

    # -- repairs ----------------------------------------------------------------------------
    def take_repairs(self, limit: int = 256) -> list[tuple[int, list[FetchSource]]]:
        """Zpages below their replica count whose bytes must be fetched back: (location,
        sources), no more than the outbox has room for.  Repairs served from the local disk
        copy are done here and not returned."""
        out: list[tuple[int, list[FetchSource]]] = []
        peers = self.membership.peers
        later = []  # every source failed a call lately: wait for one to answer a heartbeat
        limit = min(limit, self._outbox_room())
        while self._repairs and len(out) < limit:
            location = self._repairs.popleft()
            entry = self.entries.get(location)
            if entry is None or entry.zpage is not None or self._needed(entry) <= 0:
                continue
            if entry.disk and self.local is not None:
                try:
                    zpage = self.local.load(entry.pool_id, entry.disk)
                except CorruptPage:  # a damaged disk copy does not count: fetch another
                    self._drop_disk(location, entry)
                else:
                    self.repaired(location, zpage)
                    limit -= 1
                    continue
            sources = self.fetch_sources(location)
            if any(not peers[s.address].suspect for s in sources):
                out.append((location, sources))
            elif sources:
                later.append(location)
            else:
                self._unreachable(entry)
        self._repairs.extend(later)
        self.stats.repairs_pending = len(self._repairs)
        return out

    def repaired(self, location: int, zpage: bytes | None) -> None:
        """The fetched bytes of a zpage under repair (None: every source failed)."""
        entry = self.entries.get(location)
        if entry is None:
            return
        if zpage is None:
            if self.fetch_sources(location):
                self._repairs.append(location)  # retried on a later pass
            else:
                self._unreachable(entry)
            return
        entry.zpage = zpage
        self.outbox += 1
        self.outbox_bytes += len(zpage)
        self.stats.rereplicated += 1
        # copies on leaving peers stop counting once the zpage is placed again
        for address in [a for a in entry.holders if self._leaving(a)]:
            self._drop_holder(location, address, flush=True)
        self._pending.append(location)

    def _unreachable(self, entry: Entry) -> None:
        """No live holder has a copy.  If a down holder may still come back with one, the
        repair waits for it (`_rejoined`); with no holder left at all, the page is lost."""
        if not entry.holders:
            self.stats.lost += 1

    def _leaving(self, address: str) -> bool:
        peer = self.membership.peers.get(address)
        return peer is None or peer.leaving

    # -- stop -------------------------------------------------------------------------------
    def close(self) -> int:
        """Graceful stop: refuse new zpages, give what waits in the outbox a disk copy, and
        leave a compact journal.  The number of outbox zpages that found no room on disk (they
        are lost with the process)."""
        self.closing = True
        stranded = 0
        for location, entry in self.entries.items():
            if entry.zpage is not None:
                self._disk_copy(location, entry)
                if entry.disk or entry.holders:
                    self._settle(entry)
                else:
                    stranded += 1
        if self.journal is not None:
            self._compact_journal()
            self.journal.close()
        return stranded

    # -- introspection ----------------------------------------------------------------------
    @property
    def remote_pages(self) -> int:
        return len(self.entries)

    @property
    def peer_copies(self) -> int:
        """Copies of our zpages that peers hold, as far as the table knows."""
        return sum(len(held) for held in self.by_peer.values())

    def replica_histogram(self) -> dict[int, int]:
        """How many zpages have n live copies (peers + disk)."""
        hist: dict[int, int] = {}
        peers = self.membership.peers
        for entry in self.entries.values():
            n = sum(1 for a in entry.holders if a in peers and peers[a].up) + (
                1 if entry.disk else 0
            )
            hist[n] = hist.get(n, 0) + 1
        return hist
