# The node's side of the ramster layer: identity, foreign store, layer, gRPC transport, driver.
#
# Built only in a cluster (seeds, or a peer listener others may join); a node without runs
# exactly as before (its evictor is the backing file alone).  Members join and leave at runtime
# (ramster/remote/membership.py): the servicer learns a heartbeat's sender, replies gossip the
# members we see, and the foreign store admits as many owners as there are members.  The
# engine's evictor is the chain [layer, backing file]: the reaper's persistent zpages go to
# peers while any has room, else to disk.  The driver
# task heartbeats and pumps in the background; gets call `prefetch()` so remote copies are
# fetched before the synchronous engine reads them.  Beside it a HeapTrimmer (node/heap.py)
# gives the heap back to the OS once a burst of zpage traffic is over.
#
# Start: the layer rebuilds its table from the journal in the data directory (before the engine
# adopts pages), and `start()` waits, up to `down_after`, until every member known by then has
# been asked and every one that answers has told what it still holds for us, so gets of pages
# parked before a restart find them.
#
# Graceful stop: `leave()` answers heartbeats with leaving=true and takes no new foreign pages,
# so every owner copies what this node holds elsewhere and flushes it here; the node waits until
# it holds no foreign page or the time runs out.  `close()` then stops the driver and closes the
# layer: it refuses new zpages (so the engine's write-back goes to disk), gives what is still in
# its outbox a disk copy and compacts the journal.  The room on disk that the backing file keeps
# for a stop's writes covers the outbox as well as the engine's RAM (save_room).
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from node.driver import RemoteDriver
from node.heap import HeapTrimmer
from node.logs import log_event
from node.peering import GrpcTransport, Identity, PeerServicer
from node.sealing import OVERHEAD as SEALING_OVERHEAD
from node.sealing import Sealer, load_sealing_key
from node.settings import Settings
from ramster.remote import ForeignStore, RamsterLayer, RemoteConfig
from ramster.remote.events import Joined, Leaving
from ramster.remote.foreign import MAX_SPLIT
from ramster.remote.journal import Journal
from ramster.zcache import PAGE_SIZE, ZCache
from ramster.zcache.backing import BackingFile
from ramster.zcache.evictor import EvictorChain


class RemoteSide:
    def __init__(self, settings: Settings, backing: BackingFile) -> None:
        self.identity = Identity(settings.node_id, uuid.uuid4().hex)
        self.config = RemoteConfig(
            replicas=settings.replicas,
            heartbeat_interval=settings.heartbeat_interval,
            down_after=settings.down_after,
            forget_after=settings.forget_after,
            largest_zpage=MAX_SPLIT - SEALING_OVERHEAD,  # sealed, a holder must take it
        )
        self.foreign = ForeignStore(
            max(1, settings.foreign_limit // PAGE_SIZE), max_owners=max(1, len(settings.peers))
        )
        self.journal = Journal(settings.data_dir)
        self.journal.on_unwritten = _journal_unwritten
        if self.journal.not_compacted:
            log_event("remote_journal_not_compacted", logging.WARNING, why="the disk is full")
        self.layer = RamsterLayer(
            self.identity.node_id,
            self.identity.incarnation,
            [str(p) for p in settings.peers],
            self.config,
            local=backing,
            journal=self.journal,
        )
        self.chain = EvictorChain([self.layer, backing])
        self.backing = backing
        sealer = Sealer(load_sealing_key(settings.data_dir), settings.node_id)
        self.transport = GrpcTransport(self.identity, sealer, timeout=settings.peer_timeout)
        self.servicer = PeerServicer(
            self.foreign, self.identity, self.layer.membership.gossip, self._heard_of
        )
        self.driver: RemoteDriver | None = None
        self.trimmer = HeapTrimmer(self._moved, settings.heartbeat_interval * 2)
        self._task: asyncio.Task[None] | None = None

    async def start(self, engine: ZCache) -> None:
        """Run the driver; return once every peer that answered the first heartbeat has said
        what it holds for us, or after down_after."""
        self.driver = RemoteDriver(
            self.layer,
            self.transport,
            lambda pool, keys: self.chain.held_by(self.layer, engine.evicted_locations(pool, keys)),
        )
        self._task = asyncio.create_task(self._run(self.driver))
        peers = self.layer.membership.peers
        deadline = time.monotonic() + self.config.down_after
        while time.monotonic() < deadline:
            await asyncio.sleep(self.config.heartbeat_interval / 5)
            if self.driver.heartbeats and all(
                p.asked and (p.synced or not p.up) for p in peers.values()
            ):
                break
        stats = self.layer.stats
        log_event(
            "remote_index_recovered",
            remote_pages=stats.recovered,
            peers_synced=sum(p.synced for p in peers.values()),
            copies_reclaimed=stats.reclaimed,
            orphans_flushed=stats.orphans_flushed,
            lost=stats.lost,
        )

    def advertise(self, address: str) -> None:
        """Where peers reach us (known once the peer listener is bound): told in heartbeats,
        and never a member of our own."""
        self.identity.address = address
        self.layer.membership.selves.add(address)
        self.layer.membership.drop(address)

    def _heard_of(self, address: str) -> None:
        """An owner's heartbeat says where it is reached: a member (new ones join at once), and
        one more owner the foreign store admits."""
        self.layer.handle(Joined((address,), time.monotonic()))
        self.foreign.max_owners = max(self.foreign.max_owners, len(self.layer.membership.peers))

    async def _run(self, driver: RemoteDriver) -> None:
        try:
            await asyncio.gather(driver.run(), self.trimmer.run())
        except Exception as exc:  # said at once: peers are no longer used from now on
            log_event("remote_driver_failed", logging.ERROR, exc_info=exc)
            raise

    def _read_ahead(self) -> int:
        return self.driver.ahead.pages if self.driver is not None else 0

    def _moved(self) -> int:
        """Zpages that went through this node's layer so far: sent, fetched, held."""
        stats = self.layer.stats
        return stats.remote_puts + stats.remote_gets + stats.rereplicated + self.foreign.moved

    async def prefetch(self, pool: int, keys: list[tuple[int, int]]) -> Callable[[], bool] | None:
        if self.driver is None:
            return None
        return await self.driver.prefetch(pool, keys)

    async def leave(self, timeout: float) -> None:
        """Announce the stop and wait, up to `timeout`, until owners have taken back what we
        hold and every member that is up has heard us say so (so each forgets us at once when
        we are gone, instead of waiting forget_after for a node that may come back)."""
        identity = self.identity
        identity.leaving = True
        held = self.foreign.pages
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            self.foreign.pages or not identity.told >= self._live_members()
        ):
            await asyncio.sleep(0.1)
        log_event(
            "left",
            foreign_pages_before=held,
            foreign_pages_left=self.foreign.pages,
            members_told=len(identity.told),
        )

    def _live_members(self) -> set[str]:
        return {p.node_id for p in self.layer.membership.live() if p.node_id}

    async def stop_driver(self) -> None:
        """No more calls to peers; the layer refuses new zpages from now on."""
        self.layer.handle(Leaving())
        if self.driver is not None:
            self.driver.ahead.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.transport.close()

    def save_room(self, pages: int, frames: int) -> bool:
        """The engine's save_room: the backing file's cover() of its pages in RAM (`pages` in
        `frames`) and of the outbox's, which close() writes to disk too (and from which alone
        the layer makes disk copies, settling what it copies)."""
        layer = self.layer
        outbox_frames = -(-layer.outbox_bytes // PAGE_SIZE)
        return self.backing.cover(pages + layer.outbox, frames + outbox_frames)

    def close(self) -> None:
        """After the engine's write-back: the outbox to disk, the journal compacted."""
        stranded = self.layer.close()
        if stranded:
            log_event("outbox_not_saved", logging.ERROR, pages=stranded)
        if self.journal.waiting:
            log_event(
                "remote_journal_not_saved",
                logging.ERROR,
                records=self.journal.waiting,
                why="the disk is full: copies made since are not found again at the next start",
            )
        self.foreign.close()

    def stats(self) -> dict[str, int]:
        """The layer's numbers for the Stats RPC (field names of ramster.v1.StatsResponse)."""
        layer, peers = self.layer, self.layer.membership.peers
        return {
            "remote_pages": layer.remote_pages,
            "remote_outbox": layer.outbox,
            "foreign_pages": self.foreign.pages,
            "peers_up": sum(p.up for p in peers.values()),
            "peers": len(peers),
            "rereplicated_pages": layer.stats.rereplicated,
            "remote_lost_pages": layer.stats.lost,
        }

    def metric_families(self) -> list[Metric]:
        """Metrics of the ramster layer, read from its live tables: call on the event loop
        (node/metrics.py's LoopCollector does, for the scrape thread)."""
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        layer, stats, peers = self.layer, self.layer.stats, self.layer.membership.peers
        yield GaugeMetricFamily(
            "ramster_peers_up", "Peers answering heartbeats.", sum(p.up for p in peers.values())
        )
        yield GaugeMetricFamily("ramster_peers", "Members known (self excluded).", len(peers))
        yield GaugeMetricFamily(
            "ramster_remote_pages",
            "This node's pages held by peers (or queued for them).",
            layer.remote_pages,
        )
        for name, text, value in (
            ("remote_outbox_pages", "Evicted pages waiting to be placed on peers.", layer.outbox),
            ("remote_outbox_bytes", "Bytes of the pages in the outbox.", layer.outbox_bytes),
            ("remote_flushes_pending", "Flushes owed to peers.", layer.flushes_pending),
            ("remote_peer_copies", "Copies of this node's pages held by peers.", layer.peer_copies),
            (
                "remote_journal_waiting_records",
                "Journal records waiting in memory for room on the disk (lost in a crash).",
                self.journal.waiting,
            ),
        ):
            yield GaugeMetricFamily(f"ramster_{name}", text, value)
        replicas = GaugeMetricFamily(
            "ramster_remote_replicas_pages",
            "Remote pages by the number of live copies they have (peers plus disk).",
            labels=["copies"],
        )
        for copies, count in sorted(layer.replica_histogram().items()):
            replicas.add_metric([str(min(copies, 9))], count)
        yield replicas
        for name, value, text in (
            ("remote_puts", stats.remote_puts, "Pages stored on peers."),
            ("remote_put_refusals", stats.remote_refused, "Pages a peer refused or failed."),
            ("remote_gets", stats.remote_gets, "Pages fetched from peers for gets."),
            ("remote_readahead", self._read_ahead(), "Pages gets asked for ahead of a client."),
            ("remote_flushes", stats.remote_flushes, "Flushes delivered to peers."),
            ("remote_disk_copies", stats.disk_copies, "Copies written to disk by the layer."),
            ("rereplication_pages", stats.rereplicated, "Pages placed again after a holder went."),
            ("remote_lost_pages", stats.lost, "Pages with no copy left anywhere."),
            ("remote_damaged_copies", stats.damaged, "Copies from peers that failed checks."),
            ("remote_recovered_pages", stats.recovered, "Remote pages found in the journal."),
            ("remote_reclaimed_copies", stats.reclaimed, "Copies peers still held at start."),
            ("remote_orphans_flushed", stats.orphans_flushed, "Unknown copies flushed at start."),
            ("remote_outbox_refused", stats.outbox_refused, "Evicted pages left to the disk."),
            ("heap_trims", self.trimmer.trims, "Heap trims after bursts of zpage traffic."),
        ):
            yield CounterMetricFamily(f"ramster_{name}", text, value)
        yield CounterMetricFamily(
            "ramster_heap_trim_seconds", "Time spent trimming the heap.", self.trimmer.seconds
        )
        yield GaugeMetricFamily(
            "ramster_rereplication_pending_pages",
            "Pages waiting to be re-replicated.",
            stats.repairs_pending,
        )
        yield GaugeMetricFamily(
            "ramster_foreign_pages", "Pages this node holds for peers.", self.foreign.pages
        )
        yield GaugeMetricFamily(
            "ramster_foreign_pool_size_bytes",
            "Memory holding peers' pages.",
            self.foreign.cache.frames * PAGE_SIZE,
        )
        yield GaugeMetricFamily(
            "ramster_foreign_pool_limit_bytes",
            "Limit of memory for peers' pages.",
            self.foreign.capacity_frames * PAGE_SIZE,
        )
        yield CounterMetricFamily(
            "ramster_foreign_refused",
            "Peers' pages refused (no room, quota, damaged).",
            self.foreign.refused,
        )


def _journal_unwritten(waiting: bool, records: int) -> None:
    """The journal's disk filled up (records wait in memory) or took them again."""
    if waiting:
        log_event(
            "remote_journal_waiting",
            logging.WARNING,
            records=records,
            why="the disk is full: records wait in memory, and a crash would lose them",
        )
    else:
        log_event("remote_journal_written", why="the disk took the records that waited")
