# One node's lifecycle: start (engine, gRPC servers, health, reflection, metrics), serve until a
# signal, drain, stop.
#
# Two gRPC listeners, as etcd has: the client API on --listen (ramster.v1.Tmem, health, and
# reflection listing only those), and, in a cluster (seeds in --peers, or --peer-listen set so
# that nodes started later can join), the peer API on --peer-listen (ramster.v1.Peer and
# health; node/settings.py's peer_address() gives the default), each a
# grpc.aio server of its own, so no client ever reaches a peer method and the peer port can sit
# on another network.  With --tls-* (node/tls.py) the client listener serves TLS and the peer
# listener mTLS, whose calls PeerAuthInterceptor checks against the caller's node certificate;
# the node dials its peers with that same certificate.  Protected mode is checked before
# anything is opened.  Each listener holds at most --max-connections connections, and closes one
# that has not finished its handshake after HANDSHAKE_SECONDS (grpc core's connection quota and
# handshake timeout), so half-open connections cannot use up the node's descriptors.  With
# peers the engine's evictor is the chain [ramster layer, backing file]; without, the backing
# file alone (data_dir/backing.dat, whose written-back pages a restart finds again).  With
# --nbd-listen it serves NBD exports (node/nbd/) from the same engine: started after the engine,
# stopped first.
#
# The data directory holds the node's identity (identity.json: the node id it belongs to, so a
# second node cannot adopt another's pages), its lock (`lock`: flocked by the one node process
# using the directory, and holding its pid, so a second process on it stops at the start; one
# started while the last is still writing its pages back at a stop read the backing file as
# it was cut and died of SIGBUS), its pools (pools.log), its backing file and, with
# peers, the journal of what is parked where.  Start: pools are recreated under their ids, then
# the engine adopts the pages the backing file and the journal know; with peers, health turns
# SERVING once the peers that answer have said what they still hold (RemoteSide.start).
#
# Shutdown order (SIGTERM/SIGINT, or stop() from tests): health flips to NOT_SERVING and the
# gate refuses new client RPCs with UNAVAILABLE; with peers, the node announces it is leaving and
# keeps serving peers until its owners have copied what it holds elsewhere (up to `grace`); the
# gRPC server stops taking calls and gives running ones up to `grace` seconds (then cancels
# them); the metrics endpoint closes; the driver stops; every persistent page still in RAM is
# written back to the backing file (the ramster layer refuses from now on) and the layer saves
# its outbox and journal; the engine and then the backing file close last (marked clean:
# nothing to redo on restart).  Persistent pages therefore survive a graceful restart; after a
# crash, those that were on disk or on peers do, and only pages in RAM alone are lost.
# Startup failures (a port in use, an unusable data directory)
# raise StartupError with a one-line reason; main() turns it into a log line and exit status 1.
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node.cluster import RemoteSide
from node.engine import build_engine, codec_threads, open_backing, stop_codec_workers
from node.fairness import SmallFirst
from node.interceptor import Gate, RpcInterceptor, StreamLimit
from node.logs import log_event
from node.loopwatch import LoopWatch
from node.metrics import NodeMetrics, backing_families, lost_pools_families, read_backing
from node.nbd import NbdServer, serve_nbd
from node.nbd.server import OWNER_PREFIX as NBD_OWNER
from node.peering import PEER_SERVICE, PeerAuthInterceptor
from node.pools import PoolRegistry, PoolRegistryError, Pools
from node.reclaimer import Reclaimer
from node.servicer import TmemServicer, add_tmem_to_server
from node.settings import HostPort, Settings, advertised, clustered, peer_address
from node.tenants import load_tenants
from node.tls import ROTATION_CHECK, NodeTls, Rotation, check_protected, load_tls
from ramster import __version__
from ramster.atomicfile import replace_file
from ramster.remote.journal import JournalError
from ramster.v1 import peer_pb2_grpc, tmem_pb2
from ramster.wire import CHANNEL_OPTIONS
from ramster.zcache import PoolKind, ZCache
from ramster.zcache.backing import BackingFile, BackingFileError

IDENTITY_FILE = "identity.json"
LOCK_FILE = "lock"
# what a gRPC connection gets to finish its TLS handshake and HTTP/2 preface (gRPC's own default
# is two minutes): connections that stop half way hold a descriptor and ~15 KB each until then
HANDSHAKE_SECONDS = 10.0
TMEM_SERVICE = tmem_pb2.DESCRIPTOR.services_by_name["Tmem"].full_name


class StartupError(Exception):
    """The node cannot start; the message says why."""


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gate = Gate()
        self.port = 0
        self.peer_port: int | None = None
        self.metrics_port: int | None = None
        self.engine: ZCache | None = None
        self.backing: BackingFile | None = None
        self.remote: RemoteSide | None = None
        self.registry: PoolRegistry | None = None
        self.pools: Pools | None = None
        self.tenants = load_tenants(None, settings.max_pools)  # --tokens is read by start()
        self.streams = StreamLimit(settings.max_streams)
        self.small_first = SmallFirst()  # small client calls ahead of bulk work (gRPC and NBD)
        self._nbd: NbdServer | None = None
        self._servers: list[grpc.aio.Server] = []
        self._metrics: NodeMetrics | None = None
        self._health = health.aio.HealthServicer()
        self._peer_health = health.aio.HealthServicer()
        self._watch: LoopWatch | None = None
        self._reclaimer: Reclaimer | None = None
        self._servicer: TmemServicer | None = None
        self.rotation: Rotation | None = None
        self._rotating: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._lock = -1  # the data directory's lock (claim_data_dir), held until stop()

    @property
    def target(self) -> str:
        return str(HostPort(self.settings.listen.host, self.port))

    @property
    def peer_target(self) -> str:
        return str(HostPort(peer_address(self.settings).host, self.peer_port or 0))

    def _grpc_server(self, *interceptors: grpc.aio.ServerInterceptor) -> grpc.aio.Server:
        assert self._metrics is not None
        server = grpc.aio.server(
            # one RpcInterceptor per server: it caches handlers by method name, and both
            # servers have grpc.health.v1.Health/Check
            interceptors=[
                RpcInterceptor(
                    self.gate, self._metrics.grpc, self.tenants, self.streams, self.small_first
                ),
                *interceptors,
            ],
            options=[
                *CHANNEL_OPTIONS,
                ("grpc.so_reuseport", 0),  # a second node on a port fails
                ("grpc.max_allowed_incoming_connections", self.settings.max_connections),
                ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_SECONDS * 1000)),
            ],
        )
        self._servers.append(server)
        return server

    @staticmethod
    def _bind(
        server: grpc.aio.Server,
        flag: str,
        where: HostPort,
        credentials: grpc.ServerCredentials | None,
    ) -> int:
        try:
            port = (
                server.add_secure_port(str(where), credentials)
                if credentials
                else server.add_insecure_port(str(where))
            )
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {flag} {where}: {exc}") from None
        if not port:
            raise StartupError(f"cannot listen on {flag} {where}: address in use or unavailable")
        return int(port)

    async def start(self) -> None:
        s = self.settings
        started = time.monotonic()
        try:
            tls = load_tls(s)
            self.tenants = load_tenants(s.tokens, s.max_pools)
            peer_at = peer_address(s) if clustered(s) else None
            check_protected(s, tls, self.tenants.required, peer_at)
            self.rotation = Rotation(s, tls) if tls else None
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        try:
            self._lock = claim_data_dir(s.data_dir, s.node_id)
            registry = self.registry = PoolRegistry(s.data_dir)
            backing = self.backing = open_backing(s)
            remote = self.remote = RemoteSide(s, backing) if clustered(s) else None
            engine = self.engine = build_engine(
                s, remote.chain if remote else backing, registry.engine_pools()
            )
        except (OSError, BackingFileError, PoolRegistryError, JournalError) as exc:
            raise StartupError(f"cannot use data directory {s.data_dir}: {exc}") from None
        except ValueError as exc:  # peer settings that do not fit together
            raise StartupError(str(exc)) from None
        # what RAM (and the outbox) takes, a graceful stop can write to disk
        engine.save_room = remote.save_room if remote else backing.cover
        self.pools = Pools(engine, registry)
        if backing.stats.recovered or not backing.stats.was_clean:
            log_event(
                "backing_file_recovered",
                pages=backing.stats.recovered,
                torn_records=backing.stats.torn,
                clean_stop=backing.stats.was_clean,
            )
        if not backing.stats.was_clean:
            mark_crash_losses(registry, self.pools)
        metrics = self._metrics = NodeMetrics(engine.snapshot, __version__, s.node_id)
        metrics.on_loop.add(lambda: read_backing(backing), backing_families)
        metrics.on_loop.add(lambda: len(registry.lost), lost_pools_families)
        server = self._grpc_server()
        servicer = self._servicer = TmemServicer(
            engine,
            self.pools,
            s.node_id,
            prefetch=remote.prefetch if remote else None,
            remote_stats=remote.stats if remote else None,
            small_first=self.small_first,
            stream_metrics=metrics.streams,
        )
        self._reclaimer = Reclaimer(engine, servicer.chunked.step)
        add_tmem_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = [TMEM_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, server)
        rotation = self.rotation
        client_credentials = (
            rotation.server_credentials(rotation.current.client_auth) if rotation else None
        )
        self.port = self._bind(server, "--listen", s.listen, client_credentials)
        if remote and peer_at:
            self._serve_peers(remote, peer_at, rotation)
        if s.metrics_listen:
            try:
                self.metrics_port = metrics.serve(s.metrics_listen)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {s.metrics_listen}: {exc.strerror or exc}"
                ) from None
        for grpc_server in self._servers:
            await grpc_server.start()
        if remote:
            await remote.start(engine)
        prefetch = remote.prefetch if remote else None
        try:
            self._nbd = await serve_nbd(
                s, engine, self.pools, prefetch, metrics.nbd, self.rotation, self.small_first
            )
        except (OSError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        for service in ("", TMEM_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        for service in ("", PEER_SERVICE):
            await self._peer_health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._watch = LoopWatch(metrics.loop_lag.observe)
        self._watch.start()
        self._reclaimer.start()
        if self.rotation:
            self._rotating = asyncio.create_task(self._watch_tls(self.rotation))
        started_with = engine.snapshot()
        log_event(
            "listening",
            port=self.port,
            peer_port=self.peer_port,
            metrics_port=self.metrics_port,
            tls=tls is not None,
            host=s.listen.host,
            node_id=s.node_id,
            pool_limit_bytes=started_with.limit_bytes,
            codec_workers=codec_threads(s),
            data_dir=str(s.data_dir),
            version=__version__,
            pools=len(started_with.pools),
            pages_recovered=started_with.stored_pages,
            start_seconds=round(time.monotonic() - started, 3),
        )
        if s.port_file:  # last: whoever waits for it finds the listening event logged
            write_port_file(s.port_file, self.port, self.peer_port, self.metrics_port)

    def _serve_peers(self, remote: RemoteSide, where: HostPort, tls: Rotation | None) -> None:
        """The peer listener: ramster.v1.Peer and health, mTLS with an identity check per call
        when TLS is configured; the transport then dials peers with this node's certificate."""
        server = self._grpc_server(*([PeerAuthInterceptor()] if tls else []))
        self.gate.always.add(PEER_SERVICE)
        peer_pb2_grpc.add_PeerServicer_to_server(remote.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._peer_health, server)
        assert self._metrics is not None
        self._metrics.on_loop.add(remote.metric_families, lambda families: families)
        credentials = tls.server_credentials(require_client_cert=True) if tls else None
        self.peer_port = self._bind(server, "--peer-listen", where, credentials)
        remote.advertise(advertised(self.settings, self.peer_port))
        if tls:
            transport, loop = remote.transport, asyncio.get_running_loop()
            transport.credentials = tls.current.channel_credentials()

            def redial(new: NodeTls) -> None:
                loop.call_soon_threadsafe(transport.use_credentials, new.channel_credentials())

            tls.on_change.append(redial)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace if grace is None else grace
        deadline = time.monotonic() + grace
        log_event("draining", in_flight=self.gate.in_flight, grace_s=grace)
        if self._nbd:  # block devices first: their acknowledged writes land before the engine goes
            await self._nbd.stop(grace)
        self.gate.draining = True
        if self._servicer:  # page streams end as new page calls are refused
            self._servicer.pages.drain()
        await self._health.enter_graceful_shutdown()
        await self._peer_health.enter_graceful_shutdown()
        if self.remote:  # owners copy what we hold elsewhere while we still serve it
            await self.remote.leave(timeout=grace)
            self.remote.servicer.fetches.drain()  # then their fetch calls end
        # new calls meet the gate (UNAVAILABLE) until the running ones are done; only then does
        # the server stop, which would cancel late arrivals instead
        await self.gate.idle(max(0.0, deadline - time.monotonic()))
        await asyncio.gather(
            *(server.stop(max(0.0, deadline - time.monotonic())) for server in self._servers)
        )
        if self._watch:
            await self._watch.stop()
        if self._rotating:
            self._rotating.cancel()
        if self._metrics:
            self._metrics.close()
        if self.remote:
            await self.remote.stop_driver()
        if self._reclaimer:
            await self._reclaimer.stop()
        if self.engine:
            stop_codec_workers(self.engine)  # the front doors are closed: no batch needs them
            written, refused = self.engine.write_back_all()
            level = logging.ERROR if refused else logging.INFO
            log_event("written_back", level, pages=written, refused=refused)
        if self.remote:
            self.remote.close()
        if self.engine:
            self.engine.close()
        if self.backing:
            self.backing.close()
        if self.registry:
            self.registry.close()
        self._unlock()
        max_stall = self._watch.max_stall if self._watch else 0.0
        log_event("stopped", max_loop_stall_ms=round(max_stall * 1000, 3))

    def _unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def catch_signals(self) -> asyncio.Event:
        """An event set by SIGTERM or SIGINT (instead of their default of killing the process);
        SIGHUP re-reads the TLS files at once (node/tls.py)."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.rotation and self.rotation.check())
        return signalled

    @staticmethod
    async def _watch_tls(rotation: Rotation) -> None:
        while True:
            await asyncio.sleep(ROTATION_CHECK)
            rotation.check()


def claim_data_dir(data_dir: Path, node_id: str) -> int:
    """Make `data_dir` this node's: lock it, then refuse one that belongs to another node id.
    The lock's descriptor, for the node to close at its stop."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(data_dir)
    try:
        check_identity(data_dir, node_id)
    except BaseException:
        os.close(lock)
        raise
    return lock


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock of `data_dir`'s lock file, which then holds this process's pid;
    StartupError, naming the holder's pid, if another process holds it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"data directory {data_dir} is in use by another node process (pid {holder}), "
            "which may still be writing its pages back after a stop: wait for it to exit, or "
            "use another --data-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_identity(data_dir: Path, node_id: str) -> None:
    """Make `data_dir` node `node_id`'s, or refuse one that belongs to another node id."""
    path = data_dir / IDENTITY_FILE
    try:
        owner = json.loads(path.read_text())["node_id"]
    except FileNotFoundError:
        replace_file(path, json.dumps({"node_id": node_id}).encode())
        return
    except (ValueError, KeyError, TypeError):
        raise StartupError(f"{path} is damaged: it must name the node id") from None
    if owner != node_id:
        raise StartupError(
            f"data directory {data_dir} belongs to node {owner!r}, not {node_id!r}: start with "
            f"--node-id {owner} or use another --data-dir"
        )


def mark_crash_losses(registry: PoolRegistry, pools: Pools) -> None:
    """After a crash (the backing file was not closed): the clients' persistent pools may have
    lost pages (those held in RAM alone), so their gets answer PAGE_STATUS_LOST for what they
    lack until their owners accept it (node/pools.py); logged at ERROR with their ids.  (An NBD
    export's lost blocks read as EIO: node/nbd/blockmap.py.)"""
    persistent = sorted(
        record.pool_id
        for record in registry.pools.values()
        if record.kind is PoolKind.PERSISTENT and not record.owner.startswith(NBD_OWNER)
    )
    if not persistent:
        return
    try:
        registry.mark_lost(persistent)
    except OSError as exc:  # marked until the node stops: a full disk must not keep it down
        log_event("pools_log_not_written", logging.ERROR, error=exc.strerror, mark="lost")
    log_event(
        "persistent_pages_may_be_lost",
        logging.ERROR,
        pools=[pools.public(p) for p in persistent],
        why="the node crashed: pages these pools held in RAM alone (not yet on disk or a "
        "peer) are gone; their gets answer PAGE_STATUS_LOST for pages they lack until the "
        "owner calls AcceptLoss",
    )


def write_port_file(path: Path, port: int, peer_port: int | None, metrics_port: int | None) -> None:
    """Write the bound ports atomically, so a reader never sees half a file."""
    ports = {"port": port, "peer_port": peer_port, "metrics_port": metrics_port}
    replace_file(path, json.dumps(ports).encode(), durable=False)  # read by its starter only
