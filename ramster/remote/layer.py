# The ramster layer on the owner's side: an evictor that parks zpages in peers' RAM.
#
# zcache's reaper calls `evict()` synchronously; the zpages are accepted into an outbox (bounded;
# beyond it, or with no peer up, evict refuses and the next evictor, the backing file, takes
# them) and get a *location*, an id in this layer's table.  Everything else goes through one
# sans-IO interface (ramster/remote/events.py): the node feeds events to `handle()` and
# performs the actions of `actions()` (per peer: Flushes, then Sends; a Fetch for repairs),
# `probes()` (heartbeats), `reclaims()` and `fetch_for()` (before a get), each answered by the
# event that names it.  Each zpage wants `replicas` copies: on distinct peers when enough have
# room, else on the peers there are plus the local backing file.  Until it has them the zpage
# stays in the outbox, so a get is served locally and nothing is ever lost to a refusal or a
# dead peer: it is placed again elsewhere, and failing every peer it goes to disk.
#
# A get of a remote page needs I/O, so the node asks `fetch_for()` what to fetch (live holders
# first), fetches and verifies the zpages and hands them back (Fetched); zcache's `load()` then
# finds them here; with no holder reachable the disk copy serves, if any.  `forget()` (flush,
# overwrite, promotion home) owes flushes to every holder, sent and retried until the holder
# takes them; they gather per peer (FLUSH_BATCH of them, a heartbeat interval, or sends going to
# that peer, which they must precede), so gets that bring pages home do not cost a call per
# page.  When a peer goes down, restarts or announces it is leaving, every zpage it held is
# queued for repair: a surviving copy is fetched (a Fetch with repair set) and placed again like
# a new one.  A peer marked down is not forgotten at once: if it was only slow or cut off, it
# comes back with its copies, which then count again (extra ones are flushed), and a page whose
# only reachable copy is on it waits for it instead of being declared lost.  A restart (a new
# incarnation) loses what a peer held; a member gone for good is forgotten once every copy it
# held has another reachable one (membership.py says who joins and leaves).
#
# Durability: with a `Journal`, every copy that comes to exist (a peer's stored reply, a disk
# write) and every location forgotten is recorded in the data directory, so a restarted owner
# rebuilds its table and zcache adopts the pages under their old keys (`recovered()`).  A zpage
# that has its copies keeps its bytes in the outbox until the journal's records of them are on
# disk (`_settle`, `_release_saved`): on a full disk they wait in memory, and a stop that cannot
# save them gives the zpage a disk copy instead (the backing file finds it again by its key), so
# no page depends on records that were lost; the outbox fills meanwhile and evict() refuses.
# A peer is used only once *synced*: the owner has asked it (Reclaim) what it still keeps and
# matched that with the table, dropping copies it lost and flushing what the table does not
# know, so no orphan outlives the owner's recovery (a member learnt at runtime is asked too).
# `close()` (graceful stop) writes what is still in the outbox to disk and compacts the journal.
#
# Bounds: the outbox (zpages whose bytes wait here for copies) is limited in pages and bytes;
# beyond it evict() refuses and the backing file takes the zpages, and repairs are fetched only
# while the outbox has room for them.  evict() also refuses a zpage longer than a holder can
# take (largest_zpage, which a sealed raw page fits since holders split long blobs): every peer
# would refuse it, and as a page short of copies it would be read back from disk and offered
# again every down_after.  (A holder of a version that took no long blob refuses the whole call
# that carries one, and the send's zpages go to other holders or the disk, as for any failed
# call.)  `wake` (set by the driver) is called whenever work is queued, so nothing waits for a
# timer.
#
# The table of where each zpage's copies are is a RemoteTable (narrow arrays, 4 bytes per remote
# page with a few pools and peers, no keys: holders file copies under the table's slot); only
# zpages in flight (bytes in the outbox, sends in progress, refusals, damaged copies, fetched
# copies staged for gets) have entries in small dicts beside it.
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from ramster.remote.config import RemoteConfig
from ramster.remote.events import (
    Action,
    Event,
    Fetch,
    Fetched,
    FetchSource,
    Flush,
    Flushed,
    FlushItem,
    Heard,
    Joined,
    Leaving,
    Placed,
    Probe,
    Reclaim,
    Reclaimed,
    Refused,
    Send,
    Sent,
    Silent,
    Tick,
    Wanted,
)
from ramster.remote.journal import Journal
from ramster.remote.membership import Membership, Peer, PeerEvent, PeerInfo
from ramster.remote.table import SLOT_MASK, RemoteTable, slot_of
from ramster.zcache.codec import zpage_key
from ramster.zcache.errors import CorruptPage, PageUnavailable
from ramster.zcache.evictor import Evictor

NOBODY: frozenset[str] = frozenset()
STAGED_LIMIT = 4096  # fetched copies kept for gets (about 6 MiB at a 3x ratio)
FLUSH_BATCH = 256  # flushes owed to one peer that are sent without waiting for more
MemberEvents = list[tuple[str, PeerEvent]]  # (member address, what happened to it), for logs


class LocalDisk(Evictor, Protocol):
    """The local backing file, as the layer uses it for its own disk copies."""

    def claim(self, pool_id: int, location: int, oid: int, index: int) -> bool:
        """Take a record found on open as the layer's own (zcache must not adopt it)."""
        ...


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
    outbox_refused: int = 0  # zpages evict() refused (outbox full, no peer up, too long...)
    repairs_pending: int = field(default=0)
    recovered: int = 0  # locations found again in the journal at start
    reclaimed: int = 0  # copies peers still held for us when asked after a restart
    orphans_flushed: int = 0  # copies peers held that the table did not know


class RamsterLayer:
    def __init__(
        self,
        node_id: str,
        incarnation: str,
        seeds: list[str],
        config: RemoteConfig | None = None,
        local: LocalDisk | None = None,
        seed: int | None = None,
        journal: Journal | None = None,
        advertise: str = "",
    ) -> None:
        self.config = config or RemoteConfig()
        self.membership = Membership(
            node_id,
            incarnation,
            seeds,
            self.config.down_after,
            seed,
            advertise,
            self.config.forget_after,
        )
        self.local = local
        self.journal = journal
        self.stats = LayerStats()
        self.table = RemoteTable()
        self._bytes: dict[int, bytes] = {}  # the outbox: zpages waiting for their copies
        self._sending: dict[int, set[str]] = {}  # peers with a copy in flight, by location
        self._tried: dict[int, frozenset[str]] = {}  # peers that refused a copy lately
        self._damaged: dict[int, frozenset[str]] = {}  # holders whose copy failed its check
        self._pending: deque[int] = deque()  # locations that need a copy placed
        # settled locations whose bytes stay until the journal has their records on disk:
        # (the journal's `appended` at settling, location) in order, and each one's latest mark
        self._unsaved: deque[tuple[int, int]] = deque()
        self._marks: dict[int, int] = {}
        self._repairs: deque[int] = deque()  # locations whose bytes must be fetched back first
        self._flushes: dict[str, list[FlushItem]] = {}  # owed to each peer
        self._flush_since: dict[str, float] = {}  # when take_flushes first saw them waiting
        self._staged: OrderedDict[int, bytes] = OrderedDict()  # oldest first, dropped in O(1)
        self._short: set[int] = set()  # settled with fewer copies than wanted
        self._short_tried = 0.0
        self._forget_checked: dict[str, float] = {}  # when a down member's copies were looked at
        self.outbox_bytes = 0
        # moves each time a live location loses a local copy (outbox bytes settled, staged copy
        # dropped, disk copy dropped): a get that found its pages local finds them local again
        # while this has not moved, so the node need not look at them twice (driver.prefetch)
        self.local_losses = 0
        self.closing = False  # set at a graceful stop: evict() refuses, the disk takes all
        self.wake: Callable[[], None] = lambda: None  # the driver's: work was queued
        if journal is not None:  # ask every peer what it holds for us before using it
            for peer in self.membership.peers.values():
                peer.synced = False
            self._recover(journal)

    # -- the interface: events in, actions out -----------------------------------------------
    def handle(self, event: Event) -> MemberEvents:
        """Take in what happened; what it did to the membership (for logs)."""
        membership = self.membership
        match event:
            case Heard(address, info, now):
                peer = membership.peers.get(address)
                if peer is None:  # a seed heartbeated for discovery: learn, verify next round
                    itself = address if info.address in ("", address) else info.address
                    return self._learn([itself, *info.members], now)
                peer.asked = True
                return self._heard(address, info, now)
            case Silent(address):
                peer = membership.peers.get(address)
                if peer is not None:
                    peer.asked = True
                membership.failed(address)
            case Tick(now):
                down = [(a, PeerEvent.DOWN) for a in self._expire(now)]
                return down + [(a, PeerEvent.FORGOTTEN) for a in self._forget_gone(now)]
            case Joined(addresses, now):
                return self._learn(list(addresses), now)
            case Sent(send, stored):
                self._sent(send, stored)
            case Refused(send):
                membership.failed(send.address)
                self._sent(send, (False,) * len(send.items))
            case Flushed(flush, ok):
                self._flushed(flush, ok)
            case Fetched(fetch, copies, damaged):
                for location, address in damaged:
                    self._mark_damaged(location, address)
                for location, _, _ in fetch.wanted:
                    if fetch.repair:
                        self._repaired(location, copies.get(location))
                    elif location in copies:
                        self._stage(location, copies[location])
            case Reclaimed(address, copies):
                self._reclaimed(address, set(copies))
            case Leaving():
                self.closing = True
        return []

    def actions(self, now: float) -> list[Action]:
        """The calls to make now: per peer its flushes, then its sends (a flush of a key must
        reach a holder before a newer copy of the same key does, or it would delete that
        copy), and one fetch of the copies that repairs need."""
        sends = self._take_sends()
        out: list[Action] = [*self._take_flushes(now, {s.address for s in sends}), *sends]
        repairs = self._take_repairs()
        if repairs:
            out.append(Fetch(tuple(repairs), repair=True))
        return out

    def probes(self) -> list[Probe]:
        """Heartbeats due each interval: every member, and every seed that is not one."""
        members = [Probe(a, verify=True) for a in self.membership.peers]
        return members + [Probe(a, verify=False) for a in self.membership.discovery()]

    def reclaims(self) -> list[Reclaim]:
        """Members that answer but have not said what they still hold for us."""
        peers = self.membership.peers.values()
        return [Reclaim(p.address, p.epoch) for p in peers if p.up and not p.synced]

    def fetch_for(self, locations: list[int]) -> Fetch | None:
        """What to fetch before zcache loads `locations` (this layer's): None if every one is
        local (outbox, staged, disk) or has no live holder."""
        wanted = tuple(self._wanted(locations))
        return Fetch(wanted, repair=False) if wanted else None

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self, journal: Journal) -> None:
        """Rebuild the table from the journal: copies on peers (configured or learnt before the
        restart: they are members again), disk copies the backing file still has.  A location
        left with neither is lost (its other copy was in RAM); peers are asked what they still
        hold once they answer (`reclaimed`)."""
        peers, table = self.membership.peers, self.table
        self.membership.learn({a for rec in journal.recovered.values() for a in rec.holders}, 0.0)
        for location, rec in journal.recovered.items():
            disk = rec.disk
            if disk and not (
                self.local and self.local.claim(rec.pool_id, disk, rec.oid, rec.index)
            ):
                disk = 0
                journal.disk(location, 0)
            holders = [a for a in rec.holders if a in peers]
            if not holders and not disk:
                self.stats.lost += 1
                journal.forget(location)
                continue
            table.restore(location, rec.pool_id, rec.allocator)
            table.set_disk(location, disk)
            for address in holders:
                table.add_holder(location, address)
        table.compact_free_list()
        table.floor = table.high = journal.high_gen + 1
        journal.commit()
        self.stats.recovered = table.count

    def _compact_journal(self) -> None:
        """Rewrite the journal: its keys of live locations, with their copies from the table."""
        if self.journal is None:
            return
        table = self.table

        def copies(location: int) -> tuple[list[str], int] | None:
            if location not in table:
                return None
            return table.holders_of(location), table.disk_of(location)

        self.journal.compact(copies, table.high)

    def _reclaimed(self, address: str, copies: set[tuple[int, int]]) -> None:
        """What `address` still holds for us, (pool, slot) of each copy, asked once after our
        start: copies the table expects there but the peer lost are dropped (and repaired);
        copies the table does not know are flushed.  From now on the peer is used."""
        peer = self.membership.peers.get(address)
        if peer is None:
            return
        table = self.table
        held = table.held_by(address)
        lost = set()
        for location in held:
            copy = (table.pool_of(location), slot_of(location))
            if copy in copies:
                copies.discard(copy)
                self.stats.reclaimed += 1
            else:
                lost.add(location)
        for location in lost:
            self._drop_holder(location, address, flush=False)
        for pool_id, slot in copies:
            self._owe_flush(address, FlushItem(peer.epoch, pool_id, slot))
        self.stats.orphans_flushed += len(copies)
        self._commit()
        peer.synced = True
        # what it holds and what has no peer copy at all (saved to disk at our stop) may be
        # short of copies: now there is a peer to place them on
        self._queue_repairs({*held, *self.table.without_holders()})
        self._retry_short()

    # -- membership -------------------------------------------------------------------------
    def _heard(self, address: str, info: PeerInfo, now: float) -> list[tuple[str, PeerEvent]]:
        """A heartbeat reply from member `address`: the events it implies (also for other
        entries of the same node, and members learnt from it), acted on."""
        events = self.membership.heard(address, info, now)
        for peer, event in events:
            if event is PeerEvent.RESTARTED:
                self._lose(peer)
            elif event is PeerEvent.LEAVING:
                self._drain(peer)
            elif event is PeerEvent.UP:
                self._rejoined(peer)
            elif event in (PeerEvent.ALIAS, PeerEvent.GONE):
                self._drop_member(peer)
            if event in (PeerEvent.RESTARTED, PeerEvent.UP):
                self._retry_short()
        events += self._learn([info.address, *info.members], now)
        return events

    def _learn(self, addresses: list[str], now: float) -> list[tuple[str, PeerEvent]]:
        """Member addresses heard of (gossip, a heartbeat's sender): the new ones join."""
        new = self.membership.learn(addresses, now)
        if new:
            self.wake()
        return [(address, PeerEvent.JOINED) for address in new]

    def _drop_member(self, address: str) -> None:
        """Forget a member entry: what the table says it holds is dropped (repaired from other
        copies), what it is owed is not sent."""
        self._lose(address)
        self._forget_checked.pop(address, None)
        self.membership.drop(address)

    def _forget_gone(self, now: float) -> list[str]:
        """Forget members that left or stayed down `forget_after`, once no page depends on
        them: each copy they hold has another reachable one (a live holder, the disk, the
        outbox).  A page whose last copy is on a down member keeps it, in case it comes back.
        Looked at once per `down_after` per member (a scan of the table)."""
        gone = []
        for peer in self.membership.forgettable(now):
            address = peer.address
            if self.table.copies.get(address):
                if now - self._forget_checked.get(address, -self.config.down_after) < (
                    self.config.down_after
                ):
                    continue
                self._forget_checked[address] = now
                if not all(self._elsewhere(loc, address) for loc in self.table.held_by(address)):
                    continue
            self._drop_member(address)
            gone.append(address)
        return gone

    def _elsewhere(self, location: int, address: str) -> bool:
        if location in self._bytes or self.table.disk_of(location):
            return True
        peers = self.membership.peers
        return any(
            a != address and a in peers and peers[a].up for a in self.table.holders_of(location)
        )

    def _drain(self, address: str) -> None:
        """`address` is leaving: its copies that are not needed (enough elsewhere) are flushed
        now, the others once each page is placed again (`_repaired`)."""
        held = set(self.table.held_by(address))
        for location in held:
            if self._needed(location) <= 0:
                self._drop_holder(location, address, flush=True)
        self._commit()
        self._queue_repairs(held)

    def _retry_short(self) -> None:
        """A peer (re)appeared: zpages settled short of copies may get them now."""
        short, self._short = self._short, set()
        self._queue_repairs({loc for loc in short if loc in self.table})

    def _expire(self, now: float) -> list[str]:
        """Mark silent peers down and queue repairs of what they held; their addresses.
        Their copies are not forgotten: a peer that was only slow or cut off comes back with
        them, and until then they are the last resort of a page whose other copies are gone."""
        down = self.membership.expire(now)
        for address in down:
            self._queue_repairs(set(self.table.held_by(address)))
        if self._short and now - self._short_tried > self.config.down_after:
            self._short_tried = now  # a slow retry, in case a peer got room since
            self._retry_short()
        return down

    def _rejoined(self, address: str) -> None:
        """A peer answers again, same process: its copies count again.  Where that makes more
        copies than wanted, its copy is flushed; where copies are still missing, repair."""
        for location in self.table.held_by(address):
            need = self._needed(location)
            if need < 0:
                self._drop_holder(location, address, flush=True)
            elif need > 0:
                self._queue_repairs({location})
        self._commit()

    def _lose(self, address: str) -> None:
        """`address` restarted: what it held is gone."""
        self._flushes.pop(address, None)
        self._flush_since.pop(address, None)
        held = self.table.held_by(address)
        for location in held:
            self._drop_holder(location, address, flush=False)
        self._commit()
        self._queue_repairs(set(held))

    def _drop_holder(self, location: int, address: str, flush: bool) -> None:
        if not self.table.drop_holder(location, address):
            return
        if flush:
            self._flush_copy(address, location)
        if self.journal is not None:
            self.journal.drop(location, address)

    def _flush_copy(self, address: str, location: int) -> None:
        peer = self.membership.peers.get(address)
        if peer is not None:
            item = FlushItem(peer.epoch, self.table.pool_of(location), slot_of(location))
            self._owe_flush(address, item)

    def _owe_flush(self, address: str, item: FlushItem) -> None:
        owed = self._flushes.setdefault(address, [])
        owed.append(item)
        if len(owed) == FLUSH_BATCH:
            self.wake()

    def _queue_repairs(self, locations: set[int]) -> None:
        for location in locations:
            if self._needed(location) > 0:
                if location in self._bytes:
                    self._queue_send(location)
                else:
                    self._repairs.append(location)
        self.stats.repairs_pending = len(self._repairs)
        if locations:
            self.wake()

    def _counted(self) -> int:
        """The table's bits of the peers whose copies count: up and not leaving."""
        peers = self.membership.peers
        mask = 0
        for address, bit in self.table.bits.items():
            peer = peers.get(address)
            if peer is not None and peer.up and not peer.leaving:
                mask |= 1 << bit
        return mask

    def _needed(self, location: int, counted: int | None = None) -> int:
        """Copies `location` still wants: its replicas less those on counted peers (`counted`:
        a `_counted()` taken since the membership and the table's bits last changed), on disk
        and in flight."""
        table, slot = self.table, location & SLOT_MASK
        have = (table.holders[slot] & (self._counted() if counted is None else counted)).bit_count()
        if table.disk is not None and table.disk[slot]:
            have += 1
        sending = self._sending.get(location)
        return self.config.replicas - have - (len(sending) if sending else 0)

    # -- evictor interface ------------------------------------------------------------------
    def _outbox_room(self) -> int:
        if self.outbox_bytes >= self.config.outbox_limit_bytes:
            return 0
        return self.config.outbox_limit - len(self._bytes)

    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        """Take zpages into the outbox while it has room, a peer has room and the journal is
        not too far behind (journal_waiting_limit); never one that no holder could take
        (longer than largest_zpage), which would only be refused by every peer and left short
        of copies, retried for ever."""
        room = 0 if self.closing or not self.membership.has_room() else self._outbox_room()
        journal = self.journal
        if journal is not None and journal.waiting >= self.config.journal_waiting_limit:
            room = 0  # the disk is full: the records of more copies would only wait too
        largest = self.config.largest_zpage
        picked = [i for i, z in enumerate(zpages) if len(z) <= largest][: max(0, room)]
        taken = [zpages[i] for i in picked]
        locations = self.table.new_many(pool_id, allocator, len(taken))
        if self.journal is not None:
            self.journal.keys(locations, pool_id, allocator, [zpage_key(z) for z in taken])
        self._bytes.update(zip(locations, taken, strict=True))
        self._pending.extend(locations)
        self.outbox_bytes += sum(map(len, taken))
        self.stats.outbox_refused += len(zpages) - len(taken)
        if taken:
            self.wake()
        out = [0] * len(zpages)
        for i, location in zip(picked, locations, strict=True):
            out[i] = location
        return out

    def load(self, pool_id: int, location: int) -> bytes:
        if location not in self.table:
            raise PageUnavailable(f"remote location {location} is unknown")
        zpage = self._bytes.get(location) or self._staged.get(location)
        if zpage is not None:
            return zpage
        disk = self.table.disk_of(location)
        holders = self.table.holders_of(location)
        if disk and self.local is not None:
            try:
                return self.local.load(pool_id, disk)
            except CorruptPage:
                if not holders:
                    raise
                self._drop_disk(location)  # the next get fetches a peer's copy
                self._queue_repairs({location})
                raise PageUnavailable(
                    f"the disk copy of remote location {location} is damaged"
                ) from None
        damaged = self._damaged.get(location, NOBODY)
        if damaged and damaged >= set(holders):
            raise CorruptPage(f"every copy of remote location {location} failed verification")
        raise PageUnavailable(f"no copy of remote location {location} could be reached")

    def forget(self, pool_id: int, locations: list[int]) -> None:
        table, journal, peers = self.table, self.journal, self.membership.peers
        staged, sending, tried, damaged = self._staged, self._sending, self._tried, self._damaged
        disks: list[int] = []
        for location in locations:
            if location not in table:
                continue
            for in_flight in (staged, sending, tried, damaged):
                in_flight.pop(location, None)
            self._short.discard(location)
            holders = table.holders_of(location)
            if holders:
                slot = slot_of(location)
                for address in holders:
                    peer = peers.get(address)
                    if peer is not None:
                        self._owe_flush(address, FlushItem(peer.epoch, pool_id, slot))
            disk = table.disk_of(location)
            if disk:
                disks.append(disk)
            zpage = self._bytes.pop(location, None)
            if zpage is not None:
                self.outbox_bytes -= len(zpage)
                self._marks.pop(location, None)
            table.free(location, holders)
            if journal is not None:
                journal.forget(location)
        if disks and self.local is not None:
            self.local.forget(pool_id, disks)
        self._commit()  # before the caller answers: a flushed page never comes back

    def recovered(self) -> Iterator[tuple[int, str, int, int, int]]:
        """The locations found again in the journal, for zcache to file under their keys
        (once: the journal's replay is dropped after this)."""
        if self.journal is None:
            return
        found, self.journal.recovered = self.journal.recovered, {}
        for location, rec in found.items():
            if location in self.table:
                yield rec.pool_id, rec.allocator, rec.oid, rec.index, location

    def _commit(self) -> None:
        journal = self.journal
        if journal is not None:
            journal.commit()
            if journal.wants_rewrite(3 * self.table.count):
                self._compact_journal()
            self._release_saved(journal.saved)

    def _release_saved(self, saved: int) -> None:
        """Drop the bytes of settled locations whose records are all on disk (`saved`: the
        journal's count of records written), unless they were queued again since."""
        unsaved, marks = self._unsaved, self._marks
        while unsaved and unsaved[0][0] <= saved:
            mark, location = unsaved.popleft()
            if marks.get(location) == mark:
                del marks[location]
                self._drop_bytes(location)

    # -- sending ----------------------------------------------------------------------------
    def _take_sends(self, limit: int | None = None) -> list[Send]:
        """Assign pending zpages to peers (at most `limit` copies); one Send per peer, a zpage's
        copies sharing one Placed."""
        budget = limit or self.config.send_batch * 4
        plans: dict[str, list[Placed]] = {}
        defer = []
        table, membership, outbox = self.table, self.membership, self._bytes
        sending_of, tried, pending = self._sending, self._tried, self._pending
        holders, largest = table.holders, self.config.largest_zpage
        among = [p for p in membership.placeable() if table.can_hold(p.address)]
        counted = self._counted()
        while pending and budget > 0:
            location = pending.popleft()
            zpage = outbox.get(location)
            if zpage is None:
                continue
            self._marks.pop(location, None)  # queued twice, settled in between: it is back
            need = self._needed(location, counted)
            sending = sending_of.get(location)
            placeable = len(zpage) <= largest  # else (a repair of too long a zpage) the disk only
            chosen: list[Peer] = []
            if need > 0 and placeable:
                exclude: AbstractSet[str] = NOBODY  # no copy anywhere yet: nobody to avoid
                if holders[location & SLOT_MASK] or sending or location in tried:
                    held = table.holders_of(location)
                    exclude = {*held, *(sending or ()), *tried.get(location, ())}
                chosen = membership.choose_many(need, exclude, among)
            if chosen:
                item = Placed(location, table.pool_of(location), zpage)
                if sending is None:
                    sending = sending_of[location] = set()
                for peer in chosen:
                    sending.add(peer.address)
                    peer.free_bytes -= len(zpage)
                    plans.setdefault(peer.address, []).append(item)
                budget -= len(chosen)
            elif sending:
                continue  # its copies in flight settle it, or queue it again
            elif need > 0:
                if not self._settle_without_peers(location, retry=placeable):
                    defer.append(location)
            else:
                self._settle(location)
        pending.extend(defer)
        self._commit()
        peers = self.membership.peers
        return [Send(a, peers[a].epoch, tuple(items)) for a, items in plans.items()]

    def _settle_without_peers(self, location: int, retry: bool = True) -> bool:
        """No (more) peer can take a copy: add a disk copy; settle if a copy exists anywhere
        (and, with `retry`, try peers again later if it is short of copies)."""
        self._disk_copy(location)
        if self.table.disk_of(location) or self.table.holders_of(location):
            self._settle(location)
            if retry and self._needed(location) > 0:  # placed again when a peer (re)appears
                self._short.add(location)
            return True
        self._tried.pop(location, None)  # nothing took it: keep the bytes, try every peer later
        return False

    def _disk_copy(self, location: int) -> None:
        zpage = self._bytes.get(location)
        if zpage is None or self.table.disk_of(location) or self.local is None:
            return
        pool_id, allocator = self.table.pool_of(location), self.table.allocator(location)
        (disk,) = self.local.evict(pool_id, allocator, [zpage])
        if disk:
            self.table.set_disk(location, disk)
            self.stats.disk_copies += 1
            if self.journal is not None:
                self.journal.disk(location, disk)

    def _drop_disk(self, location: int) -> None:
        disk = self.table.disk_of(location)
        if self.local is not None:
            self.local.forget(self.table.pool_of(location), [disk])
        self.table.set_disk(location, 0)
        self.local_losses += 1
        if self.journal is not None:
            self.journal.disk(location, 0)

    def _settle(self, location: int) -> None:
        """`location` has the copies it gets: its bytes go once the journal's records of them
        are on disk (at the next commit, unless the disk is full; at once with no journal)."""
        self._tried.pop(location, None)
        journal = self.journal
        if journal is None or location not in self._bytes:
            self._drop_bytes(location)
            return
        mark = self._marks[location] = journal.appended
        self._unsaved.append((mark, location))

    def _drop_bytes(self, location: int) -> None:
        zpage = self._bytes.pop(location, None)
        if zpage is not None:
            self.outbox_bytes -= len(zpage)
            self.local_losses += 1

    def _queue_send(self, location: int) -> None:
        """Queue a location whose bytes are here to get copies placed (its bytes stay)."""
        self._marks.pop(location, None)
        self._pending.append(location)

    def _sent(self, plan: Send, stored: tuple[bool, ...]) -> None:
        """What the peer did with each zpage of `plan` (all False if the call failed).  A zpage
        with every copy it wants settles at its last reply; one that wants more (a refusal, a
        holder lost meanwhile) is queued to be placed again, and one with copies still in
        flight waits for them."""
        address = plan.address
        peer = self.membership.peers.get(address)
        current = peer is not None and peer.epoch == plan.epoch
        table, sending_of, tried = self.table, self._sending, self._tried
        kept: list[int] = []  # the plan's locations still in the table
        held: list[int] = []  # those the peer now holds
        for (location, pool_id, _), ok in zip(plan.items, stored, strict=True):
            if location not in table:  # forgotten while in flight: take back its copy
                if ok:
                    self._owe_flush(address, FlushItem(plan.epoch, pool_id, slot_of(location)))
                continue
            kept.append(location)
            sending = sending_of.get(location)
            if sending is not None:
                sending.discard(address)
                if not sending:
                    del sending_of[location]
            if ok and current:
                held.append(location)
            else:
                tried[location] = tried.get(location, NOBODY) | {address}
                self.stats.remote_refused += 1
        if held:
            table.add_holders(held, address)
            if self._damaged:
                for location in self._damaged.keys() & held:
                    self._forget_damage(location, address)
            self.stats.remote_puts += len(held)
            if self.journal is not None:
                self.journal.holders(held, address)
        counted = self._counted()
        for location in kept:
            if self._needed(location, counted) > 0:
                self._queue_send(location)  # take_sends places more copies, or settles
            elif location not in sending_of:
                self._settle(location)  # every copy it wants is placed: its bytes go
        self._commit()

    def _forget_damage(self, location: int, address: str) -> None:
        damaged = self._damaged[location] - {address}
        if damaged:
            self._damaged[location] = damaged
        else:
            self._damaged.pop(location, None)

    # -- gets -------------------------------------------------------------------------------
    def _wanted(self, locations: list[int]) -> Iterator[Wanted]:
        """Per location that needs a fetch, the peers to ask: live, synced holders, suspects
        last, the first one rotating with the location so gets spread over the replicas.  None
        for a location that is local (outbox, staged) or has a disk copy (faster than any
        peer).  One pass: the sources are worked out once per set of holders and rotation."""
        table, outbox, staged = self.table, self._bytes, self._staged
        peers = self.membership.peers
        usable = [
            (bit, peer)
            for address, bit in table.bits.items()
            for peer in [peers.get(address)]
            if peer is not None and peer.up and peer.synced
        ]
        by_mask: dict[int, list[tuple[FetchSource, ...]]] = {}
        holders, disk, pool, pool_ids = table.holders, table.disk, table.pool, table.pool_ids
        for location in locations:
            if location not in table or location in outbox or location in staged:
                continue
            slot = location & SLOT_MASK
            mask = holders[slot]
            if not mask or (disk is not None and disk[slot]):
                continue
            orders = by_mask.get(mask)
            if orders is None:
                orders = by_mask[mask] = self._orders([p for bit, p in usable if mask >> bit & 1])
            if orders:
                yield Wanted(location, pool_ids[pool[slot]], orders[location % len(orders)])

    @staticmethod
    def _orders(live: list[Peer]) -> list[tuple[FetchSource, ...]]:
        """Each rotation of `live` (a location uses rotation location % len), suspects last."""
        out = []
        for turn in range(len(live)):
            order = live[turn:] + live[:turn]
            order.sort(key=lambda peer: peer.suspect)  # stable: the rotation stays otherwise
            out.append(tuple(FetchSource(p.address, p.epoch) for p in order))
        return out

    def _stage(self, location: int, zpage: bytes) -> None:
        """A fetched, verified copy for the get that is about to load `location`.  It stays
        (bounded, oldest out first) until the location is forgotten, so a get that runs
        concurrently with another of the same page, or one that could not bring it home,
        finds it too."""
        if location in self.table:
            self._staged[location] = zpage
            while len(self._staged) > STAGED_LIMIT:  # the oldest copies go first
                self._staged.popitem(last=False)
                self.local_losses += 1
            self.stats.remote_gets += 1

    def _mark_damaged(self, location: int, address: str) -> None:
        """`address` returned a copy of `location` that failed verification."""
        self.stats.damaged += 1
        if location in self.table and self.table.holds(location, address):
            self._damaged[location] = self._damaged.get(location, NOBODY) | {address}

    # -- flushes ----------------------------------------------------------------------------
    def _take_flushes(self, now: float, with_sends: Collection[str] = ()) -> list[Flush]:
        """Flushes owed to reachable peers that are due.  A peer's flushes are due once
        FLUSH_BATCH of them wait, once the oldest has waited a heartbeat interval, or when puts
        go to it in the same pass (they must go first); until then they gather, so a stream of
        gets that bring pages home costs one flush call per batch, not one per page.  Those
        owed to a peer that is down or failed a call since it last answered wait for it."""
        peers, since = self.membership.peers, self._flush_since
        delay = self.config.heartbeat_interval
        out = []
        for address, owed in self._flushes.items():
            peer = peers.get(address)
            if peer is None or not peer.up or not peer.synced or peer.suspect:
                continue
            first = since.setdefault(address, now)
            if len(owed) >= FLUSH_BATCH or now - first >= delay or address in with_sends:
                out.append(Flush(address, tuple(owed)))
        for flush in out:
            del self._flushes[flush.address]
            since.pop(flush.address, None)
        return out

    def _flushed(self, flush: Flush, ok: bool) -> None:
        if ok:
            self.stats.remote_flushes += len(flush.items)
        else:
            self.membership.failed(flush.address)  # retried once it answers a heartbeat again
            self._flushes.setdefault(flush.address, []).extend(flush.items)
            self._flush_since.setdefault(flush.address, 0.0)  # due again as soon as it answers

    @property
    def flushes_pending(self) -> int:
        return sum(len(f) for f in self._flushes.values())

    # -- repairs ----------------------------------------------------------------------------
    def _take_repairs(self, limit: int = 256) -> list[Wanted]:
        """Zpages below their replica count whose bytes must be fetched back: (location,
        sources), no more than the outbox has room for.  Repairs served from a copy at hand
        (staged for a get, or on the local disk) are done here and not returned."""
        out: list[Wanted] = []
        peers = self.membership.peers
        later = []  # every source failed a call lately: wait for one to answer a heartbeat
        limit = min(limit, self._outbox_room())
        while self._repairs and len(out) < limit:
            location = self._repairs.popleft()
            if location not in self.table or location in self._bytes or self._needed(location) <= 0:
                continue
            staged = self._staged.get(location)
            if staged is not None:  # fetched for a get: those bytes are as good as any
                self._repaired(location, staged)
                limit -= 1
                continue
            disk = self.table.disk_of(location)
            if disk and self.local is not None:
                try:
                    zpage = self.local.load(self.table.pool_of(location), disk)
                except CorruptPage:  # a damaged disk copy does not count: fetch another
                    self._drop_disk(location)
                else:
                    self._repaired(location, zpage)
                    limit -= 1
                    continue
            wanted = next(self._wanted([location]), None)
            if wanted is not None and any(not peers[s.address].suspect for s in wanted.sources):
                out.append(wanted)
            elif wanted is not None:
                later.append(location)
            else:
                self._unreachable(location)
        self._repairs.extend(later)
        self.stats.repairs_pending = len(self._repairs)
        return out

    def _repaired(self, location: int, zpage: bytes | None) -> None:
        """The fetched bytes of a zpage under repair (None: every source failed)."""
        if location not in self.table:
            return
        if zpage is None:
            if next(self._wanted([location]), None) is not None:
                self._repairs.append(location)  # retried on a later pass
            else:
                self._unreachable(location)
            return
        if location not in self._bytes:
            self._bytes[location] = zpage
            self.outbox_bytes += len(zpage)
        self.stats.rereplicated += 1
        # copies on leaving peers stop counting once the zpage is placed again
        for address in self.table.holders_of(location):
            if self._leaving(address):
                self._drop_holder(location, address, flush=True)
        self._queue_send(location)

    def _unreachable(self, location: int) -> None:
        """No live holder has a copy.  If a down holder may still come back with one, the
        repair waits for it (`_rejoined`); with no holder left at all, the page is lost."""
        if not self.table.holders_of(location):
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
        for location in list(self._bytes):
            self._disk_copy(location)
            if self.table.disk_of(location) or self.table.holders_of(location):
                self._settle(location)
            else:
                stranded += 1
        if self.journal is not None:
            self._compact_journal()
            self.journal.close()
        return stranded

    # -- introspection ----------------------------------------------------------------------
    @property
    def outbox(self) -> int:
        """Zpages whose bytes wait here for their copies."""
        return len(self._bytes)

    @property
    def remote_pages(self) -> int:
        return self.table.count

    @property
    def peer_copies(self) -> int:
        """Copies of our zpages that peers hold, as far as the table knows."""
        return sum(self.table.copies.values())

    def replica_histogram(self) -> dict[int, int]:
        """How many zpages have n live copies (peers + disk): one pass over the table."""
        peers, table = self.membership.peers, self.table
        up = 0
        for address, bit in table.bits.items():
            if address in peers and peers[address].up:
                up |= 1 << bit
        return dict(table.live_copies(up))
