# The node's NBD front end: an asyncio server that drives ramster.nbd's sans-IO machine and
# serves each export straight from the node's engine (no gRPC hop), so a kernel (nbd-client),
# qemu or libnbd can use the cluster as a block device.
#
# An export NAME of SIZE bytes is the persistent pool owned by "nbd:NAME" (node/pools.py finds
# it again after a restart), created to store incompressible pages raw: a block device must not
# refuse a page for compressing badly.  Block b (4096 bytes) is key (b >> 20, b & 0xFFFFF): one
# object per 4 GiB, so the index's dense per-object arrays fit a disk's mostly sequential use.
# Pages of an export leave RAM to peers and disk like any persistent page.
#
# Per request: READ gets the covering blocks (never-written ones read as zeros; a page that
# cannot be returned - corrupt, or out of reach on a peer - fails the read with EIO); WRITE puts
# whole blocks, and for a partial first or last block first reads it (read-modify-write, under a
# per-export lock so two connections' partial writes to one block cannot lose each other); a
# write is acknowledged only if every page was stored, else it fails with ENOSPC (the pages it
# replaced are gone then, as a failed write leaves its range unspecified).  TRIM flushes the whole
# blocks in its range; WRITE_ZEROES flushes them too (a flushed block reads as zeros, and all-zero
# pages cost nothing anyway) and zeroes partial edges by read-modify-write.  FLUSH and FUA have
# nothing to wait for: every acknowledged write is already in the engine, which is shared by all
# connections (hence CAN_MULTI_CONN); an export is exactly as durable as the node's persistent
# pool.
#
# The data path, built for clients that keep many requests in flight (nbdcopy: 64 per connection,
# the kernel: one per queue slot).  Each connection is an asyncio.Protocol: bytes go into the
# machine as they arrive, even while the connection's task is inside the engine, so reading the
# socket overlaps the work.  The task takes every request the buffer holds (up to BATCH_REQUESTS)
# and runs each run of consecutive READs, and of consecutive block-aligned WRITEs, as one engine
# batch (up to GROUP_PAGES pages, no block twice), so a queue of 4 KiB requests costs one engine
# call, not one each; the group's replies go out in one write before the next group runs.  Other
# requests run one by one, in order, so a connection's requests take effect in the order sent.
# Engine batches run in chunks of CHUNK_PAGES with a yield to the loop between them (gRPC calls
# wait behind one chunk, ~0.3 ms).  Flow control both ways: reading pauses while more than
# INPUT_HIGH bytes (or the write payload the machine waits for) sit unserved, and the task waits
# while more than OUTPUT_HIGH bytes of replies wait in the transport.  Metrics are counted per
# group.
#
# TLS: with --tls-* the NBD port is in the protocol's FORCEDTLS mode: a client must send STARTTLS
# before anything else (the machine answers every other option with NBD_REP_ERR_TLS_REQD), then
# the connection is upgraded in place (loop.start_tls, right after the ACK is written and before
# anything else is read, so no clear-text byte is taken for TLS), with the node's certificate and
# key; client certificates are checked against --tls-ca, and required with --tls-client-auth.
# Certificates rotate as the gRPC listeners' do (NbdTls: checked before each handshake).
# Without TLS, protected mode (node/tls.py) keeps the port on loopback unless --insecure.
#
# Shutdown (stop()): the listener closes; a connection waiting for its client closes at once,
# one running requests finishes the group in hand, answers requests it had already received with
# ESHUTDOWN and closes; whatever is still running after `grace` seconds is cancelled.
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.engine import ChunkedEngine, Prefetch
from node.logs import log_event
from node.metrics import NbdMetrics
from node.pools import Pools
from node.settings import HostPort, Settings
from node.tls import NodeTls, Rotation
from ramster.nbd import (
    NEED_DATA,
    Closed,
    Error,
    Export,
    Flush,
    Negotiated,
    Read,
    Rejected,
    Reply,
    Request,
    ServerConnection,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
)
from ramster.nbd.wire import Command
from ramster.zcache import PAGE_SIZE, PageError, ZCache, ZCacheError

OID_BITS = 20
INDEX_MASK = (1 << OID_BITS) - 1
ZERO_PAGE = bytes(PAGE_SIZE)
CHUNK_PAGES = 32  # engine pages between two yields to the loop
BATCH_REQUESTS = 64  # requests taken from the input at once
GROUP_PAGES = 256  # pages of one engine batch (1 MiB)
INPUT_HIGH = 4 * 1024 * 1024  # unserved input beyond which reading pauses
OUTPUT_HIGH = 4 * 1024 * 1024  # unsent replies beyond which the task waits (it resumes at 1/4):
# far above asyncio's 64 KiB, so the next group is computed while the socket sends this one
TLS_HANDSHAKE_SECONDS = 30.0
FLUSHES_PER_YIELD = 1024
Key = tuple[int, int]


def block_keys(first: int, stop: int) -> list[Key]:
    """Engine keys of blocks first..stop-1."""
    return [(b >> OID_BITS, b & INDEX_MASK) for b in range(first, stop)]


def span(request: Request) -> tuple[int, int]:
    """The blocks a READ or WRITE touches: first, stop."""
    return request.offset // PAGE_SIZE, -(-(request.offset + request.length) // PAGE_SIZE)


def aligned(request: Request) -> bool:
    return not (request.offset | request.length) % PAGE_SIZE


def groups(requests: list[Request]) -> Iterator[list[Request]]:
    """The batch in order, cut into runs the engine can take in one call: consecutive READs, or
    consecutive aligned WRITEs with no block twice (a put batch with a key twice would file one
    of its pages blind; a get batch may repeat a key), of at most GROUP_PAGES pages; every other
    request alone."""
    group: list[Request] = []
    kind: type[Request] | None = None  # of the open group, if it may grow
    pages = 0
    written: set[int] = set()
    for request in requests:
        this = type(request)
        if this is Read or (this is Write and request.length and aligned(request)):
            first, stop = span(request)
            fits = this is kind and pages + stop - first <= GROUP_PAGES
            if fits and this is Write:
                fits = written.isdisjoint(range(first, stop))
            if not fits:
                if group:
                    yield group
                group, kind, pages = [], this, 0
                written.clear()
            group.append(request)
            pages += stop - first
            if this is Write:
                written.update(range(first, stop))
        else:
            if group:
                yield group
            yield [request]
            group, kind = [], None
    if group:
        yield group


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """The NBD port's TLS: the node's certificate and key, clients checked against the CA (and
    required to show a certificate with --tls-client-auth).  node/tls.py checks the files."""
    assert settings.tls_cert and settings.tls_key and settings.tls_ca
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.load_verify_locations(settings.tls_ca)
    context.verify_mode = ssl.CERT_REQUIRED if settings.tls_client_auth else ssl.CERT_OPTIONAL
    return context


class NbdTls:
    """The NBD port's SSL context, made anew when the node's TLS files rotate: before each
    handshake the rotation checks the files (a stat of three, as gRPC's listeners do), and a
    change it accepts rebuilds the context; connections already open keep their session."""

    def __init__(self, settings: Settings, rotation: Rotation | None = None) -> None:
        self.settings = settings
        self.rotation = rotation
        self.context = server_tls_context(settings)
        if rotation is not None:
            rotation.on_change.append(self._reload)

    def for_handshake(self) -> ssl.SSLContext:
        if self.rotation is not None:
            self.rotation.check()
        return self.context

    def _reload(self, _: NodeTls) -> None:
        try:
            self.context = server_tls_context(self.settings)
        except OSError as exc:  # ssl.SSLError too: the files changed again under us
            log_event("nbd_tls_reload_failed", logging.WARNING, error=str(exc))


@dataclass
class ServedExport:
    export: Export
    pool: int
    rmw: asyncio.Lock = field(default_factory=asyncio.Lock)


class NbdServer:
    def __init__(
        self,
        listen: HostPort,
        exports: Sequence[Export],
        engine: ZCache,
        chunked: ChunkedEngine,
        ensure_pool: Callable[[str], int],
        metrics: NbdMetrics,
        tls: NbdTls | None = None,
    ) -> None:
        if not exports:
            raise ValueError("--nbd-listen needs at least one --nbd-export NAME:SIZE")
        self.listen = listen
        self.engine = engine
        self.chunked = chunked
        self.metrics = metrics
        self.tls = tls
        self.exports = {e.name: ServedExport(e, ensure_pool(f"nbd:{e.name}")) for e in exports}
        self.port = 0
        self.draining = False
        self._server: asyncio.Server | None = None
        self.connections: set[NbdConnection] = set()
        self._children: dict[tuple[str, Command, Error], tuple[Any, Any, Any]] = {}

    async def start(self) -> int:
        """Listen; the port (the chosen one, with port 0)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: NbdConnection(self), self.listen.host, self.listen.port
            )
        except OSError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log_event(
            "nbd_listening",
            port=self.port,
            host=self.listen.host,
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

    def count(
        self, served: ServedExport, group: list[Request], replies: list[Reply], seconds: float
    ) -> None:
        """Metrics of one group: requests by result and bytes moved (added up per group, as
        each increment takes a lock), and each request's latency (the group's)."""
        name = served.export.name
        tally: dict[tuple[Command, Error], list[int]] = {}
        for request, reply in zip(group, replies, strict=True):
            counts = tally.setdefault((request.command, reply.error), [0, 0])
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
            for _ in range(n):
                latency.observe(seconds)
            if moved_bytes is not None:
                moved_bytes.inc(moved)

    # -- requests ---------------------------------------------------------------------------------
    async def execute(self, served: ServedExport, group: list[Request]) -> list[Reply]:
        """The replies to one group of groups()."""
        if self.draining:
            return [Reply(request, Error.ESHUTDOWN) for request in group]
        try:
            first = group[0]
            if isinstance(first, Read):
                return await self._reads(served.pool, group)
            if isinstance(first, Write) and len(group) > 1:
                return await self._writes(served.pool, group)
            return [await self._execute(served, first)]
        except ZCacheError as exc:  # e.g. the pool was destroyed under the export
            log_event("nbd_engine_error", logging.ERROR, export=served.export.name, error=str(exc))
            return [Reply(request, Error.EIO) for request in group]

    async def _execute(self, served: ServedExport, request: Request) -> Reply:
        if isinstance(request, Write):
            return Reply(request, await self._write(served, request.offset, request.data))
        if isinstance(request, Trim):
            await self._flush_blocks(served.pool, request.offset, request.length)
            return Reply(request)
        if isinstance(request, WriteZeroes):
            return Reply(request, await self._zero(served, request.offset, request.length))
        assert isinstance(request, Flush)
        return Reply(request)  # nothing is cached in front of the engine (see the header)

    async def _reads(self, pool: int, group: list[Request]) -> list[Reply]:
        """Consecutive READs as one engine batch."""
        spans = [span(r) for r in group]
        keys = [key for first, stop in spans for key in block_keys(first, stop)]
        pages = await self.chunked.get_batch(pool, keys, exclusive=False)
        replies, at = [], 0
        for request, (first, stop) in zip(group, spans, strict=True):
            mine, at = pages[at : at + stop - first], at + stop - first
            if any(isinstance(p, PageError) for p in mine):
                replies.append(Reply(request, Error.EIO))
                continue
            data = b"".join([self._page(p) for p in mine])
            skip = request.offset - first * PAGE_SIZE
            if skip or len(data) != request.length:
                data = data[skip : skip + request.length]
            replies.append(Reply(request, data=data))
        return replies

    async def _writes(self, pool: int, group: list[Request]) -> list[Reply]:
        """Consecutive aligned WRITEs of distinct blocks as one engine batch."""
        keys: list[Key] = []
        pages: list[bytes] = []
        for request in group:
            assert isinstance(request, Write)
            first, stop = span(request)
            keys += block_keys(first, stop)
            data = request.data
            pages += [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
        results = await self.chunked.put_batch(pool, keys, pages)
        replies, at = [], 0
        for request in group:
            n = request.length // PAGE_SIZE
            refused = any(r.refused for r in results[at : at + n])
            replies.append(Reply(request, Error.ENOSPC if refused else Error.OK))
            at += n
        return replies

    async def _write(self, served: ServedExport, offset: int, data: bytes) -> Error:
        if not data:
            return Error.OK
        end = offset + len(data)
        if offset % PAGE_SIZE or end % PAGE_SIZE:
            async with served.rmw:
                return await self._put(served.pool, offset, data)
        return await self._put(served.pool, offset, data)

    async def _put(self, pool: int, offset: int, data: bytes) -> Error:
        """Store `data` at `offset`, reading the partial first and last blocks first."""
        end = offset + len(data)
        first, stop = offset // PAGE_SIZE, -(-end // PAGE_SIZE)
        partial = sorted(
            b for b in {first, stop - 1} if b * PAGE_SIZE < offset or (b + 1) * PAGE_SIZE > end
        )
        old = (
            await self.chunked.get_batch(pool, [block_keys(b, b + 1)[0] for b in partial], False)
            if partial
            else []
        )
        if any(isinstance(p, PageError) for p in old):
            return Error.EIO
        before = dict(zip(partial, old, strict=True))
        pages = []
        for block in range(first, stop):
            start = block * PAGE_SIZE - offset  # where this block begins in data (may be < 0)
            if block in before:
                page = bytearray(self._page(before[block]))
                lo, hi = max(start, 0), min(start + PAGE_SIZE, len(data))
                page[lo - start : hi - start] = data[lo:hi]
                pages.append(bytes(page))
            else:
                pages.append(data[start : start + PAGE_SIZE])
        results = await self.chunked.put_batch(pool, block_keys(first, stop), pages)
        return Error.ENOSPC if any(r.refused for r in results) else Error.OK

    @staticmethod
    def _page(page: bytes | PageError | None) -> bytes:
        """A block's bytes from a get that had no error: a miss reads as zeros."""
        return page if isinstance(page, bytes) else ZERO_PAGE

    async def _zero(self, served: ServedExport, offset: int, length: int) -> Error:
        """Whole blocks are flushed (they read as zeros); partial edges get zero bytes."""
        end = offset + length
        inner_first, inner_stop = -(-offset // PAGE_SIZE) * PAGE_SIZE, end // PAGE_SIZE * PAGE_SIZE
        if inner_first >= inner_stop:  # within one block, or across one boundary only
            return await self._write(served, offset, bytes(length))
        await self._flush_blocks(served.pool, inner_first, inner_stop - inner_first)
        for lo, hi in ((offset, inner_first), (inner_stop, end)):
            if hi > lo:
                error = await self._write(served, lo, bytes(hi - lo))
                if error is not Error.OK:
                    return error
        return Error.OK

    async def _flush_blocks(self, pool: int, offset: int, length: int) -> None:
        """Forget the whole blocks inside [offset, offset+length): by walking the range when it
        is smaller than the pool, else by walking the pool's index (a whole-device TRIM of a big
        export costs what is stored, not what it could hold)."""
        first, stop = -(-offset // PAGE_SIZE), (offset + length) // PAGE_SIZE
        if stop <= first:
            return
        engine = self.engine
        if stop - first <= engine.pool_pages(pool):
            keys = block_keys(first, stop)
        else:
            keys = [(o, i) for o, i in engine.keys(pool) if first <= (o << OID_BITS | i) < stop]
        flush = self.engine.flush_page
        for n, (oid, i) in enumerate(keys, 1):
            flush(pool, oid, i)
            if n % FLUSHES_PER_YIELD == 0:
                await asyncio.sleep(0)


class NbdConnection(asyncio.Protocol):
    """One client: the transport's callbacks feed the machine and wake the connection's task
    (serve()), which answers; see the header for the flow of data."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = ServerConnection(
            [s.export for s in server.exports.values()], tls_required=server.tls is not None
        )
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer = ""
        self.served: ServedExport | None = None
        self.lost = False
        self._plain = True  # not upgraded to TLS (yet)
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(OUTPUT_HIGH)
        self.peer = str(transport.get_extra_info("peername"))
        self.server.connections.add(self)
        self.server.metrics.connections.inc()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        if conn.buffered >= max(INPUT_HIGH, conn.wanted) and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self.wake()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self.wake()
        return self._plain  # keep a plain socket open to answer what came before (TLS cannot)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None

    # -- the task ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            log_event("nbd_connection_cancelled", peer=self.peer)
        except Exception as exc:  # one client's failure must not take the node down
            log_event("nbd_connection_failed", logging.ERROR, exc_info=exc, peer=self.peer)
        finally:
            self.server.connections.discard(self)
            self.server.metrics.connections.dec()
            if self.transport is not None:
                self.transport.close()

    async def _serve(self) -> None:
        conn, server = self.conn, self.server
        while not self.lost:
            requests, last = self._take()
            if requests:
                assert self.served is not None
                served = self.served
                for group in groups(requests):
                    started = time.perf_counter()
                    replies = await server.execute(served, group)
                    self._send(replies)
                    server.count(served, group, replies, time.perf_counter() - started)
                    while self._writing_paused and not self.lost:
                        await self._wait()
            self._write(conn.data_to_send())
            if isinstance(last, Closed):
                level = logging.WARNING if last.violation else logging.INFO
                log_event("nbd_disconnected", level, peer=self.peer, reason=last.reason)
                return
            if isinstance(last, StartTls):
                if not await self._start_tls():
                    return
                continue
            if not requests:
                if server.draining:  # every request received has had its answer
                    return
                if self._reading_paused and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                await self._wait()
        log_event("nbd_connection_lost", peer=self.peer)

    def _take(self) -> tuple[list[Request], Closed | StartTls | None]:
        """The requests the input holds (up to BATCH_REQUESTS), and the event that ended the
        haul if it must be handled after them (Closed, StartTls)."""
        conn = self.conn
        requests: list[Request] = []
        while len(requests) < BATCH_REQUESTS:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Request):
                requests.append(event)
            elif isinstance(event, Closed | StartTls):
                return requests, event
            elif isinstance(event, Negotiated):
                self.served = self.server.exports[event.export.name]
                log_event("nbd_connected", peer=self.peer, export=event.export.name)
            elif isinstance(event, Rejected):
                assert self.served is not None
                name = self.served.export.name
                log_event(
                    "nbd_request_rejected",
                    logging.DEBUG,
                    peer=self.peer,
                    export=name,
                    why=event.reason,
                )
                self.server.metrics.rejected.labels(name, event.error.name).inc()
        return requests, None

    def _send(self, replies: list[Reply]) -> None:
        conn, out = self.conn, [self.conn.data_to_send()]
        for reply in replies:
            out += conn.send(reply)
        if not self.lost and self.transport is not None:
            self.transport.writelines(out)

    def _write(self, data: bytes) -> None:
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)

    async def _start_tls(self) -> bool:
        """Upgrade to TLS right after the ACK went out (nothing is read in between); False if
        the handshake failed, which ends the connection."""
        assert self.transport is not None and self.server.tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self.server.tls.for_handshake(),
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS,
            )
        except OSError as exc:  # ssl.SSLError, a reset, the handshake timeout
            log_event("nbd_tls_failed", logging.WARNING, peer=self.peer, error=str(exc))
            self.lost = True
            return False
        if transport is None:  # the connection closed during the handshake
            self.lost = True
            return False
        transport.set_write_buffer_limits(OUTPUT_HIGH)
        self.transport, self._plain, self._reading_paused = transport, False, False
        self.conn.tls_started()
        log_event("nbd_tls_started", logging.DEBUG, peer=self.peer)
        return True


async def serve_nbd(
    settings: Settings,
    engine: ZCache,
    pools: Pools,
    prefetch: Prefetch | None,
    metrics: NbdMetrics,
    rotation: Rotation | None = None,
) -> NbdServer | None:
    """The NBD server the settings ask for, listening; None without --nbd-listen.  With TLS
    (`rotation`: the node's TLS material) it requires STARTTLS."""
    if settings.nbd_listen is None:
        if settings.nbd_export:
            raise ValueError("--nbd-export needs --nbd-listen HOST:PORT")
        return None
    server = NbdServer(
        settings.nbd_listen,
        settings.nbd_export,
        engine,
        ChunkedEngine(engine, chunk=CHUNK_PAGES, prefetch=prefetch),
        lambda owner: pools.ensure(owner, store_raw=True),
        metrics,
        NbdTls(settings, rotation) if rotation else None,
    )
    await server.start()
    return server
