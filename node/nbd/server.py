# The node's NBD listener: exports served straight from the node's engine (no gRPC hop), so a
# kernel (nbd-client), qemu or libnbd can use the cluster as a block device.
#
# NbdServer owns the listening socket, the exports (node/nbd/blocks.py: each a persistent pool
# of the node) and the set of live connections (node/nbd/connection.py); it counts what they
# serve into the node's NBD metrics, a group at a time (each increment takes a lock, so they
# are added up per group; the labelled children are resolved once).
#
# Codec work (LZ4, checksums) runs as the engine's does (node/engine.py): on the loop, LOOP_PAGES
# per loop step, unless --worker-threads gives the engine codec workers; then groups of
# OFFLOAD_PAGES pages or more go to them CODEC_PAGES at a time (four hops to a full write group,
# the next groups' hops queued behind, so the loop files one hop while others compress; with one
# worker, 64 pages was the least worth a hop, with two, groups from 16 pages on moved 1-2% more
# sequential writes, in six alternating runs out of six; 256-page hops, with 4 MiB write groups,
# cost the loop less than 128-page ones: node/nbd/plan.py), and only the filing, which
# alone touches the engine's state, stays on the loop; reads are opened (verified,
# decompressed) there the same way, READ_CODEC_PAGES at a time (a whole read group of
# nbdcopy's: 7% more MiB/s than 128 in alternating runs; writes gained nothing from bigger
# hops).  A worker's failure is an engine error (node/engine.py's CodecError): the group's
# requests get EIO.  Workers are not the node's default, but a node serving NBD wants them: a
# worker is a native thread that codes a hop without ever taking the GIL (node/codecworkers.py),
# and with one a node moved 10-20% more sequential writes than the loop alone and 1.5-2x the
# reads (`ramster bench nbd`, 2 cores; reads went from 424 to 644-739 MiB/s when the workers
# stopped being Python threads, which took the GIL several times per hop); with two encoders
# below the loop's priority, 2-7% more writes than with one (the opener is one either way).
#
# Heap: the zpages of a write group are bytes in the heap between their encoding and their
# filing, so a burst of writes leaves the heap grown by what was in flight; a HeapTrimmer
# (node/heap.py) gives it back once the exports have moved TRIM_AFTER pages and then paused for
# TRIM_INTERVAL, and the connections then drop the input chunks they kept for reuse (up to
# node/nbd/connection.py's SPARE_CHUNKS MiB each), so an idle connection holds one, and the
# arena gives back the freed frames it keeps warm (up to 4 MiB).
#
# Who may use an export: with TLS, a client is known by its certificate's name (the spiffe://
# ramster/client/NAME of `ramster certs`, node/nbd/tls.py); an export that --nbd-allow names
# serves the clients named for it only, and to any other it does not exist (not listed, and
# ERR_UNKNOWN to INFO/GO, as gRPC answers NOT_FOUND for another tenant's pool), so a VM's disk
# is not readable with another VM's certificate; an export never named serves every client the
# TLS handshake let in.  Without TLS there is no name to go by, so --nbd-allow needs
# --tls-client-auth.
#
# What clients can make the node hold: at most max_connections (--nbd-max-connections) are in
# transmission at once, so a flood of connections cannot pin unbounded input (each holds ~80 MiB
# at most, node/nbd/connection.py): one that negotiates past the limit is closed.  Connections
# still negotiating (the only kind a client without a certificate can open when TLS is required)
# are counted apart, as many at most, and each must be through negotiation (TLS included) within
# NEGOTIATION_SECONDS of its accept or is closed: a flood of them keeps new clients from getting
# in for that long, but neither touches the connections already served (a VM's swap device goes
# on) nor holds more than a few pages and a descriptor each.  One source (an IPv4 address, an
# IPv6 /64, a Unix socket's user: node/nbd/connection.py's source_of) negotiates at most a
# quarter of those at once, so a flood from one host leaves the other hosts room to get in;
# many hosts together can still fill them.
#
# Sizes are the operator's to change between runs, but an export declared smaller than the data
# its pool holds stops the node at start (check_size): the blocks past its end would stay stored
# out of reach, and come back if it grew again, so shrinking takes discarding them first.  An
# export no longer declared keeps its pool and pages, and the node logs it at each start, until
# --nbd-drop NAME has the node destroy its pool at start (in RAM, on peers, on disk) and remove
# its block map.  Each export's block map (node/nbd/blockmap.py, a file of the data directory,
# in memory without one) is opened after that size check, as it follows the declared
# size; the blocks it says hold data that the pool's index lacks (lost in a crash) are logged
# at the start (nbd_blocks_lost), and read as EIO until written, zeroed or trimmed again.
#
# It listens on HOST:PORT, or on a Unix socket (unix:PATH, node/nbd/unixsocket.py: mode 0600,
# for clients on the node's host; its file is removed on stop).
#
# Shutdown (stop()): the listener closes; a connection waiting for its client closes at once,
# one running requests finishes the group in hand, answers requests it had already received with
# ESHUTDOWN and closes; whatever is still running after `grace` seconds is cancelled.
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node.engine import ChunkedEngine, Prefetch
from node.fairness import SmallFirst
from node.heap import HeapTrimmer
from node.logs import log_event
from node.metrics import NbdMetrics, observe_many
from node.nbd.blockmap import BlockMap, map_path
from node.nbd.blocks import Answer, ExportBlocks, ReadWait, WritePlan, data_end
from node.nbd.connection import NbdConnection
from node.nbd.plan import Group
from node.nbd.tls import NbdTls
from node.nbd.unixsocket import bind_unix, remove_unix
from node.pools import Pools
from node.settings import HostPort, Settings, UnixPath
from node.tls import Rotation
from ramster.nbd import Error, Export
from ramster.nbd.wire import Command
from ramster.zcache import PAGE_SIZE, ZCache

LOOP_PAGES = 32  # pages per loop step on the loop, codec work included (gRPC calls wait ~0.4 ms)
CODEC_PAGES = 256  # with codec workers: pages per hop, filed in one loop step (~1 ms; 128
# while small calls come, node/engine.py's SHARED_PAGES) ...
READ_CODEC_PAGES = 256  # ... and of a read, whose hop costs the loop only the zpages' read-out
OFFLOAD_PAGES = 16  # ... for batches this big (a hop costs more than it saves on smaller ones)
TRIM_INTERVAL = 0.25  # seconds without NBD traffic before the heap is trimmed
OWNER_PREFIX = "nbd:"  # an export NAME's pool is owned by "nbd:NAME" (node/pools.py)


class NbdServer:
    def __init__(
        self,
        listen: HostPort | UnixPath,
        exports: Sequence[Export],
        engine: ZCache,
        ensure_pool: Callable[[str], int],
        metrics: NbdMetrics,
        tls: NbdTls | None = None,
        prefetch: Prefetch | None = None,
        small_first: SmallFirst | None = None,
        socket_group: int | None = None,
        allow: Sequence[tuple[str, str]] = (),
        max_connections: int = 64,
        read_wait: float = 0.0,
        map_dir: Path | None = None,
    ) -> None:
        if not exports:
            raise ValueError("--nbd-listen needs at least one --nbd-export NAME:SIZE")
        self.listen = listen
        self.socket_group = socket_group  # may connect to a Unix socket too
        self.engine = engine
        self.metrics = metrics
        self.tls = tls
        chunked = ChunkedEngine(
            engine,
            LOOP_PAGES,
            prefetch,
            offload=OFFLOAD_PAGES,
            hop=CODEC_PAGES,
            get_hop=READ_CODEC_PAGES,
            small_first=small_first,
        )
        wait = ReadWait(read_wait, lambda: self.draining, metrics.read_waits)
        self.exports: dict[str, ExportBlocks] = {}
        try:
            for e in exports:
                pool = ensure_pool(OWNER_PREFIX + e.name)
                check_size(e, engine, pool)  # before the map is cut to the size declared
                path = None if map_dir is None else map_path(map_dir, pool)
                block_map = BlockMap(path, -(-e.size // PAGE_SIZE))
                blocks = ExportBlocks(e, pool, engine, chunked, wait, block_map)
                self.exports[e.name] = blocks
                lost = blocks.adopt_index()
                metrics.lost_blocks.labels(e.name).inc(lost)
                if lost:
                    log_event(
                        "nbd_blocks_lost",
                        logging.ERROR,
                        export=e.name,
                        blocks=lost,
                        why="written before the node's last crash and held in its RAM alone: "
                        "they read as I/O errors until written, zeroed or trimmed again",
                    )
        except BaseException:
            self.close_maps()
            raise
        # per export named by --nbd-allow, the clients it serves (the others serve every client)
        self.allow: dict[str, set[str]] = {}
        for export, client in allow:
            if export not in self.exports:
                raise ValueError(f"--nbd-allow names {export!r}, which no --nbd-export declares")
            self.allow.setdefault(export, set()).add(client)
        self.port = 0
        self._inode: int | None = None  # of the Unix socket's file, once bound
        self.draining = False
        self._server: asyncio.Server | None = None
        self.connections: set[NbdConnection] = set()
        self.max_connections = max_connections  # in transmission, and negotiating, each
        self.transmitting = 0  # connections past negotiation
        self.per_source = max(1, max_connections // 4)  # negotiating from one source at most
        self.negotiating: Counter[str] = Counter()  # connections negotiating, by source
        self._children: dict[tuple[str, Command, Error], tuple[Any, Any, Any]] = {}
        self.moved = 0  # bytes read and written so far
        self.trimmer = HeapTrimmer(lambda: self.moved // PAGE_SIZE, TRIM_INTERVAL, self._quiet)
        self._trimming: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen; the port (the chosen one, with port 0; 0 on a Unix socket)."""
        loop, listen = asyncio.get_running_loop(), self.listen
        where: dict[str, Any] = {}
        try:
            if isinstance(listen, UnixPath):
                sock, self._inode = bind_unix(listen.path, self.socket_group)
                self._server = await loop.create_unix_server(lambda: NbdConnection(self), sock=sock)
                where["path"] = str(listen.path)
            else:
                self._server = await loop.create_server(
                    lambda: NbdConnection(self), listen.host, listen.port
                )
                self.port = int(self._server.sockets[0].getsockname()[1])
                where.update(port=self.port, host=listen.host)
        except OSError as exc:
            self._unbind()
            raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        self._trimming = asyncio.get_running_loop().create_task(self.trimmer.run())
        log_event(
            "nbd_listening",
            **where,
            tls=self.tls is not None,
            exports={name: s.export.size for name, s in self.exports.items()},
            pools={name: s.pool for name, s in self.exports.items()},
        )
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop listening, let running requests finish (up to `grace`), close every connection."""
        self.draining = True
        if self._server:
            self._server.close()
        self._unbind()
        tasks = [c.task for c in self.connections if c.task is not None]
        for connection in self.connections:
            connection.wake()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server:
            await self._server.wait_closed()
        if self._trimming is not None:
            self._trimming.cancel()
            await asyncio.gather(self._trimming, return_exceptions=True)
        self.close_maps()

    def close_maps(self) -> None:
        """Close the exports' block maps (what they hold is in the page cache already)."""
        for blocks in self.exports.values():
            blocks.map.close()

    def visible(self, client: str | None) -> list[Export]:
        """The exports a client (by its certificate's name; None: it showed no client
        certificate of the cluster) may use."""
        return [
            blocks.export
            for name, blocks in self.exports.items()
            if name not in self.allow or client in self.allow[name]
        ]

    def _unbind(self) -> None:
        """Remove the Unix socket's file, if one was bound here."""
        if isinstance(self.listen, UnixPath) and self._inode is not None:
            remove_unix(self.listen.path, self._inode)
            self._inode = None

    def _quiet(self) -> None:
        """Traffic paused: connections give back the input chunks they keep for reuse, and the
        engine's arena the freed frames it keeps warm."""
        for connection in self.connections:
            connection.conn.drop_spares()
        self.engine.arena.cool()

    async def execute(
        self, blocks: ExportBlocks, group: Group, plan: WritePlan | None = None
    ) -> list[Answer]:
        """The answers to one group of plan.groups() (ESHUTDOWN once draining)."""
        if self.draining:
            if plan is not None:
                plan.drop()
            return [(request, Error.ESHUTDOWN, ()) for request in group.requests]
        return await blocks.run(group, plan)

    def count(self, name: str, answers: list[Answer], seconds: float) -> None:
        """Metrics of one group: requests by result and bytes moved, and each request's latency
        (the group's)."""
        tally: dict[tuple[Command, Error], list[int]] = {}
        for request, error, _ in answers:
            counts = tally.setdefault((request.command, error), [0, 0])
            counts[0] += 1
            counts[1] += request.length
        for (command, error), (n, moved) in tally.items():
            key = (name, command, error)
            children = self._children.get(key)
            if children is None:  # labels() costs more than the increments: resolve it once
                m, label = self.metrics, command.name.lower()
                counted = command in (Command.READ, Command.WRITE) and error is Error.OK
                children = self._children[key] = (
                    m.requests.labels(name, label, error.name if error else "ok"),
                    m.seconds.labels(name, label),
                    m.bytes.labels(name, "read" if command is Command.READ else "written")
                    if counted
                    else None,
                )
            requests, latency, moved_bytes = children
            requests.inc(n)
            observe_many(latency, seconds, n)
            if moved_bytes is not None:
                moved_bytes.inc(moved)
                self.moved += moved


def check_size(export: Export, engine: ZCache, pool: int) -> None:
    """Refuse an export declared smaller than the data its pool holds: the data past its end
    would be out of reach yet kept, and back in sight if the export grew again."""
    name, size, end = export.name, export.size, data_end(engine, pool)
    if end > size:
        raise ValueError(
            f"export {name!r} is declared {flag_size(size)} but holds data up to "
            f"{flag_size(end)}: declare it at least {name}:{flag_size(end)}, or first discard "
            f"what lies past {flag_size(size)} (blkdiscard, qemu-io -c 'discard {size} "
            f"{end - size}') to shrink it"
        )


def flag_size(size: int) -> str:
    """A size as --nbd-export takes it, in the largest binary unit that divides it."""
    for unit, shift in (("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size and not size & ((1 << shift) - 1):
            return f"{size >> shift}{unit}"
    return str(size)


async def undeclared(settings: Settings, engine: ZCache, pools: Pools) -> None:
    """Drop the pools of the exports --nbd-drop names (pages in RAM, on peers and on disk), and
    log the other exports whose pools hold pages but that are declared no more: their pages
    stay until the export is dropped, or declared again and discarded."""
    declared, drop = {e.name for e in settings.nbd_export}, set(settings.nbd_drop)
    for name in settings.nbd_drop:
        if name in declared:
            raise ValueError(
                f"--nbd-drop names {name!r}, which --nbd-export declares: an export is "
                "either served or dropped"
            )
    for pool_id in list(engine.pool_ids()):
        owner = pools.owner_of(pool_id) or ""
        name = owner.removeprefix(OWNER_PREFIX)
        if not owner.startswith(OWNER_PREFIX) or name in declared:
            continue
        if name in drop:
            drop.discard(name)
            pages = await ChunkedEngine(engine).destroy_pool(pool_id)
            pools.forget(pool_id)
            map_path(settings.data_dir, pool_id).unlink(missing_ok=True)
            log_event("nbd_export_dropped", logging.WARNING, export=name, pages=pages)
        elif pages := engine.pool_pages(pool_id):
            log_event(
                "nbd_export_undeclared",
                logging.WARNING,
                export=name,
                pages=pages,
                hint="--nbd-drop it to free its pages, or declare it again (--nbd-export)",
            )
    for name in sorted(drop):
        log_event("nbd_export_drop_skipped", export=name, why="no export of that name has a pool")


async def serve_nbd(
    settings: Settings,
    engine: ZCache,
    pools: Pools,
    prefetch: Prefetch | None,
    metrics: NbdMetrics,
    rotation: Rotation | None = None,
    small_first: SmallFirst | None = None,
) -> NbdServer | None:
    """The NBD server the settings ask for, listening; None without --nbd-listen.  With TLS
    (`rotation`: the node's TLS material) it requires STARTTLS."""
    if settings.nbd_socket_group is not None and not isinstance(settings.nbd_listen, UnixPath):
        raise ValueError("--nbd-socket-group needs --nbd-listen unix:PATH")
    if settings.nbd_allow and not (rotation and settings.tls_client_auth):
        raise ValueError(
            "--nbd-allow needs TLS with --tls-client-auth: NBD clients are known by their "
            "certificates"
        )
    if settings.nbd_listen is None and (settings.nbd_export or settings.nbd_allow):
        flag = "--nbd-export" if settings.nbd_export else "--nbd-allow"
        raise ValueError(f"{flag} needs --nbd-listen HOST:PORT or unix:PATH")
    await undeclared(settings, engine, pools)
    if settings.nbd_listen is None:
        return None
    server = NbdServer(
        settings.nbd_listen,
        settings.nbd_export,
        engine,
        lambda owner: pools.ensure(owner, store_raw=True),
        metrics,
        NbdTls(settings, rotation) if rotation else None,
        prefetch,
        small_first,
        settings.nbd_socket_group,
        settings.nbd_allow,
        settings.nbd_max_connections,
        settings.nbd_read_wait,
        settings.data_dir,
    )
    await server.start()
    return server
