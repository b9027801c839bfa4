# The node's NBD front end: an asyncio TCP server that drives ramster.nbd's sans-IO machine and
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
# pool.  Batches go through ChunkedEngine (chunks whose codec work runs in worker threads, a yield
# between chunks), so a 32 MiB request never holds the event loop for long.  Requests of one
# connection run one after another (that is what reads the next request), several connections
# run concurrently.
#
# Shutdown (stop()): the listener closes; a connection waiting for its client closes at once,
# one running a request finishes it, answers requests it had already received with ESHUTDOWN and
# closes; whatever is still running after `grace` seconds is cancelled.
#
# NBD has no TLS: protected mode (node/tls.py) refuses a non-loopback --nbd-listen at start
# unless --insecure, since block devices in clear text would hand every page to anyone on the
# path.
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.engine import ChunkedEngine, Prefetch
from node.logs import log_event
from node.metrics import NbdMetrics
from node.pools import Pools
from node.settings import HostPort, Settings
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
    Trim,
    Write,
    WriteZeroes,
)
from ramster.nbd.wire import Command
from ramster.zcache import PAGE_SIZE, PageError, ZCache, ZCacheError

OID_BITS = 20
INDEX_MASK = (1 << OID_BITS) - 1
ZERO_PAGE = bytes(PAGE_SIZE)
READ_SIZE = 256 * 1024
HOLD_BYTES = 1024 * 1024  # replies are sent together once the buffered input is served, or
# once this much read data waits (so a burst of small replies costs one send, not one each)
FLUSHES_PER_YIELD = 1024
Key = tuple[int, int]


def block_keys(first: int, stop: int) -> list[Key]:
    """Engine keys of blocks first..stop-1."""
    return [(b >> OID_BITS, b & INDEX_MASK) for b in range(first, stop)]


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
    ) -> None:
        if not exports:
            raise ValueError("--nbd-listen needs at least one --nbd-export NAME:SIZE")
        self.listen = listen
        self.engine = engine
        self.chunked = chunked
        self.metrics = metrics
        self.exports = {e.name: ServedExport(e, ensure_pool(f"nbd:{e.name}")) for e in exports}
        self.port = 0
        self.draining = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()  # waiting for their client, not working
        self._children: dict[tuple[str, Command, Error], tuple[Any, Any, Any]] = {}

    async def start(self) -> int:
        """Listen; the port (the chosen one, with port 0)."""
        try:
            self._server = await asyncio.start_server(
                self._connection, self.listen.host, self.listen.port
            )
        except OSError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log_event(
            "nbd_listening",
            port=self.port,
            host=self.listen.host,
            exports={name: s.export.size for name, s in self.exports.items()},
            pools={name: s.pool for name, s in self.exports.items()},
        )
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop listening, let running requests finish (up to `grace`), close every connection."""
        self.draining = True
        if self._server:
            self._server.close()
        for task in self._idle:
            task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server:
            await self._server.wait_closed()

    # -- one connection ---------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.metrics.connections.inc()
        peer = str(writer.get_extra_info("peername"))
        try:
            conn = ServerConnection([s.export for s in self.exports.values()])
            await self._converse(conn, reader, writer, task, peer)
        except (ConnectionError, asyncio.CancelledError):
            log_event("nbd_connection_lost", peer=peer)
        except Exception as exc:  # one client's failure must not take the node down
            log_event("nbd_connection_failed", logging.ERROR, exc_info=exc, peer=peer)
        finally:
            self._tasks.discard(task)
            self._idle.discard(task)
            self.metrics.connections.dec()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _converse(
        self,
        conn: ServerConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None],
        peer: str,
    ) -> None:
        served: ServedExport | None = None
        out: list[bytes] = []  # replies not yet handed to the transport
        held = 0
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                writer.writelines([*out, conn.data_to_send()])
                out, held = [], 0
                if self.draining:
                    return
                await writer.drain()
                self._idle.add(task)
                data = await reader.read(READ_SIZE)
                self._idle.discard(task)
                conn.receive_data(data)
            elif isinstance(event, Request):
                assert served is not None
                started = time.perf_counter()
                reply = await self._execute(served, event)
                out.append(conn.data_to_send())
                out += conn.send(reply)
                held += len(reply.data)
                if held >= HOLD_BYTES:
                    writer.writelines(out)
                    out, held = [], 0
                    await writer.drain()
                self._count(served, event, reply.error, time.perf_counter() - started)
            elif isinstance(event, Negotiated):
                served = self.exports[event.export.name]
                log_event("nbd_connected", peer=peer, export=event.export.name)
            elif isinstance(event, Rejected):
                assert served is not None
                name = served.export.name
                log_event(
                    "nbd_request_rejected", logging.DEBUG, peer=peer, export=name, why=event.reason
                )
                self.metrics.rejected.labels(name, event.error.name).inc()
            elif isinstance(event, Closed):
                writer.writelines([*out, conn.data_to_send()])
                level = logging.WARNING if event.violation else logging.INFO
                log_event("nbd_disconnected", level, peer=peer, reason=event.reason)
                return

    def _count(self, served: ServedExport, request: Request, error: Error, seconds: float) -> None:
        key = (served.export.name, request.command, error)
        children = self._children.get(key)
        if children is None:  # labels() costs more than the increments: resolve it once
            name, command = served.export.name, request.command.name.lower()
            m = self.metrics
            moved = isinstance(request, Read | Write) and error is Error.OK
            children = self._children[key] = (
                m.requests.labels(name, command, "ok" if error is Error.OK else error.name),
                m.seconds.labels(name, command),
                m.bytes.labels(name, "read" if isinstance(request, Read) else "written")
                if moved
                else None,
            )
        requests, latency, moved_bytes = children
        requests.inc()
        latency.observe(seconds)
        if moved_bytes is not None:
            moved_bytes.inc(request.length)

    # -- requests ---------------------------------------------------------------------------------
    async def _execute(self, served: ServedExport, request: Request) -> Reply:
        if self.draining:
            return Reply(request, Error.ESHUTDOWN)
        try:
            if isinstance(request, Read):
                data = await self._read(served.pool, request.offset, request.length)
                if isinstance(data, Error):
                    return Reply(request, data)
                return Reply(request, data=data)
            if isinstance(request, Write):
                return Reply(request, await self._write(served, request.offset, request.data))
            if isinstance(request, Trim):
                await self._flush_blocks(served.pool, request.offset, request.length)
                return Reply(request)
            if isinstance(request, WriteZeroes):
                return Reply(request, await self._zero(served, request.offset, request.length))
            assert isinstance(request, Flush)
            return Reply(request)  # nothing is cached in front of the engine (see the header)
        except ZCacheError as exc:  # e.g. the pool was destroyed under the export
            log_event("nbd_engine_error", logging.ERROR, export=served.export.name, error=str(exc))
            return Reply(request, Error.EIO)

    async def _read(self, pool: int, offset: int, length: int) -> bytes | Error:
        if not length:
            return b""
        first, stop = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        pages = await self.chunked.get_batch(pool, block_keys(first, stop), exclusive=False)
        if any(isinstance(p, PageError) for p in pages):
            return Error.EIO
        data = b"".join([self._page(p) for p in pages])
        skip = offset - first * PAGE_SIZE
        return data if skip == 0 and len(data) == length else data[skip : skip + length]

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
        index = self.engine.pool(pool).index
        if stop - first <= index.count:
            keys = block_keys(first, stop)
        else:
            keys = [
                (oid, i) for oid, i, _ in index.items() if first <= (oid << OID_BITS | i) < stop
            ]
        flush = self.engine.flush_page
        for n, (oid, i) in enumerate(keys, 1):
            flush(pool, oid, i)
            if n % FLUSHES_PER_YIELD == 0:
                await asyncio.sleep(0)


async def serve_nbd(
    settings: Settings,
    engine: ZCache,
    pools: Pools,
    prefetch: Prefetch | None,
    metrics: NbdMetrics,
) -> NbdServer | None:
    """The NBD server the settings ask for, listening; None without --nbd-listen."""
    if settings.nbd_listen is None:
        if settings.nbd_export:
            raise ValueError("--nbd-export needs --nbd-listen HOST:PORT")
        return None
    server = NbdServer(
        settings.nbd_listen,
        settings.nbd_export,
        engine,
        ChunkedEngine(engine, prefetch=prefetch),
        lambda owner: pools.ensure(owner, store_raw=True),
        metrics,
    )
    await server.start()
    return server
