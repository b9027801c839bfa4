# One NBD client connection: an asyncio.BufferedProtocol that feeds ramster.nbd's sans-IO
# machine, and a task that serves what it parses.
#
# Data path, built for clients that keep many requests in flight (nbdcopy: 64 per connection over 4
# connections, the kernel: one per queue slot).  The socket is read straight into the machine's
# input chunk (get_buffer / buffer_updated: no copy; a write's payload reaches the engine as a view
# of it), even while the task is inside the engine, so reading overlaps the work.  The task takes
# every request parsed (up to BATCH_REQUESTS), cuts them into groups (node/nbd/plan.py) and runs
# each as one engine batch (node/nbd/blocks.py), one after the other in the order received.  Up to
# AHEAD_GROUPS groups are planned before their turn: a WRITE group's encoding starts in the codec
# workers when it is planned (node/engine.py's encode_ahead), so the workers code the next groups
# while the loop files this one, reads the socket and sends replies; nothing is filed before its
# turn, so the order of effects is the order of the groups.  Planning (_plan) runs before each group
# and also from buffer_updated while the task is in a group, so requests that arrive meanwhile reach
# the workers at once (3-4% more sequential writes than planning only between groups, in alternating
# runs).  Without planning ahead, a connection's next group reached the workers only once this one
# was answered, and the one worker sat idle a fifth of the time on nbdcopy's sequential writes (2
# connections); planning ahead moved ~10% more of them (measured in alternating runs, with the input
# bound below raised with it: at 1 MiB a take held little more than one group).  A group's replies
# go out before the next group runs, a read's pages as the engine gave them: while the transport
# holds nothing unsent, one sendmsg on a duplicate of the plain socket's descriptor sends what the
# socket takes straight from the pieces, and only the rest goes to the transport (whose writelines,
# on 3.11, joins the pieces first: a copy of every byte read, 6% of the loop's time on sequential
# reads; sending so moved 7.5% more of them).  No task or future per request: the only awaits per
# group are the engine's, and a yield once the task has served groups for TURN_SECONDS.  Flow
# control both ways: reading pauses while more than INPUT_HIGH bytes (or the write payload the
# machine waits for) sit unserved, and resumes once under INPUT_LOW (or that payload); the task
# waits while more than OUTPUT_HIGH bytes of replies wait in the transport.  The machine parses
# ahead of the task by at most its EVENTS_HIGH events or 16 KiB of its own replies (option
# replies, rejections); the rest waits unparsed, counted in the input, and the task goes on
# parsing it only while the transport takes replies: a client that never reads them, or floods
# options while negotiating, is held up by TCP.  So a connection holds at most INPUT_HIGH of
# input not taken, the requests of one take not planned yet, and AHEAD_GROUPS groups planned
# with their encodings: up to ~24 MiB, in input chunks it keeps for reuse (SPARE_CHUNKS: 48 MiB
# at most), mmaps that go back to the OS once traffic pauses (NbdServer._quiet) or it closes.
# Metrics are counted per group.
#
# TLS: after the machine's StartTls the connection is upgraded in place (loop.start_tls, right
# after the ACK is written and before anything else is read, so no clear-text byte is taken for
# TLS); the TLS transport reads into the same buffers, and every reply goes through it (the
# duplicate descriptor is closed first).  The machine then haggles over the exports the
# client's certificate may use (NbdServer.visible).
#
# Shutdown (NbdServer.stop): a connection waiting for its client closes at once, one running
# requests finishes the group in hand, answers requests it had already received with ESHUTDOWN
# and closes; encodings started for groups that will not run are dropped (their workers finish
# them, the results go unused), as when the client goes away.
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

from node.logs import log_event
from node.nbd.blocks import Answer, ExportBlocks, WritePlan
from node.nbd.plan import GROUP_PAGES, Group, groups
from node.nbd.tls import client_name
from ramster.nbd import (
    Closed,
    Negotiated,
    Rejected,
    Request,
    ServerConnection,
    StartTls,
)
from ramster.nbd.server import CHUNK
from ramster.zcache import PAGE_SIZE

if TYPE_CHECKING:
    from node.nbd.server import NbdServer

BATCH_REQUESTS = 64  # requests taken from the input at once
AHEAD_GROUPS = 3  # groups planned at once (a WRITE group's encoding started), the next included
# unserved input beyond which reading pauses: nbdcopy keeps 16 MiB in flight per connection, so
# the bound is met all the time; at 1 MiB a take held little more than one group, and 4 MiB
# moved 4-8% more sequential writes of python-app pages (256 KiB requests) than 2 (alternating
# runs, gcc pages 0-1%); 8 MiB nothing more
INPUT_HIGH = 4 * 1024 * 1024
INPUT_LOW = INPUT_HIGH // 2  # ... and under which it resumes
# input chunks kept for reuse (ramster/nbd/server.py), so that each is faulted in once: twice
# what the connection may hold at once (the input not taken, one take, the groups planned and
# the one running), as a chunk is left part-filled when a payload does not fit in its tail.
# Measured on nbdcopy's sequential writes, the loop took 0.81 CPU-s per GiB with 6, 0.71 with
# 10 and 0.67 with 16 (faults).  The server has idle connections drop them (NbdServer._quiet).
SPARE_CHUNKS = 2 * (2 * INPUT_HIGH + (AHEAD_GROUPS + 1) * GROUP_PAGES * PAGE_SIZE) // CHUNK
OUTPUT_HIGH = 4 * 1024 * 1024  # unsent replies beyond which the task waits (it resumes at 1/4):
# far above asyncio's 64 KiB, so the next group is computed while the socket sends this one
# longest a task serves without letting the loop run other work: groups of small reads and
# writes run inline (no await suspends), and so do the machine's own replies.  Under a client's
# flood of 4 KiB READs (its input holds up to ~150,000), another connection's single reads took
# p99 2.6 ms, max 5.8-9.0 ms without this yield and 1.0-2.4 ms, max 4.8-5.8 ms with it (two
# alternating runs each); under a flood of requests the machine rejects, max 278 ms without it
# and 13-24 ms with it (and 16 KiB of the machine's replies at a time, not 64)
TURN_SECONDS = 0.002
TLS_HANDSHAKE_SECONDS = 30.0
NEGOTIATION_SECONDS = 30.0  # from accept to the transmission phase (qemu-nbd allows 10 s)
IOV_MAX = 1024  # pieces one sendmsg takes (Linux's UIO_MAXIOV)
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NbdConnection(asyncio.BufferedProtocol):
    """One client: the transport's callbacks feed the machine and wake the connection's task
    (_serve()), which answers; see the header for the flow of data."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = ServerConnection(
            [s.export for s in server.exports.values()],
            tls_required=server.tls is not None,
            spare_chunks=SPARE_CHUNKS,
        )
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer = ""
        self.client: str | None = None  # the name in its TLS client certificate, if any
        self.blocks: ExportBlocks | None = None
        self.lost = False
        self._plain = True  # not upgraded to TLS (yet)
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._waiting: deque[Group] = deque()  # groups taken, not planned yet
        self._ready: deque[tuple[Group, WritePlan | None]] = deque()  # planned, WRITEs encoding
        self._last: Closed | StartTls | None = None  # the event that ended the takes, if any
        self._running = False  # the task is running a group
        self._sock: socket.socket | None = None  # the plain socket's twin, for _send_now()
        self._deadline: asyncio.TimerHandle | None = None  # of negotiation (_negotiated)
        self._transmitting = False  # counted in server.transmitting
        self._source: str | None = None  # counted in server.negotiating, until Negotiated

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix socket")
        server = self.server
        if len(server.connections) - server.transmitting >= server.max_connections:
            self._drop("limit", f"{server.max_connections} connections are negotiating already")
            return
        source = source_of(transport)
        if server.negotiating[source] >= server.per_source:
            why = f"{server.per_source} connections from {source} are negotiating already"
            self._drop("source_limit", why)
            return
        server.negotiating[source] += 1
        self._source = source
        transport.set_write_buffer_limits(OUTPUT_HIGH)
        raw = transport.get_extra_info("socket")
        if raw is not None:  # a TCP or Unix socket (never None for the node's listeners)
            self._sock = raw.dup()
        server.connections.add(self)
        server.metrics.connections.inc()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(
            NEGOTIATION_SECONDS,
            self._drop,
            "negotiation_timeout",
            f"not through negotiation after {NEGOTIATION_SECONDS:g} s",
        )
        self.task = loop.create_task(self._run())

    def _drop(self, reason: str, why: str) -> None:
        """Close the connection unserved (over the limit, or negotiation too slow)."""
        if self.lost:  # gone already (its task has yet to cancel the deadline)
            return
        log_event("nbd_connection_dropped", logging.WARNING, peer=self.peer, reason=reason, why=why)
        self.server.metrics.dropped.labels(reason).inc()
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        self.wake()

    def _negotiated(self) -> None:
        """No longer negotiating (through it, or gone): no deadline, and its source's slot
        is free."""
        if self._deadline is not None:
            self._deadline.cancel()
        source, self._source = self._source, None
        if source is not None:
            negotiating = self.server.negotiating
            negotiating[source] -= 1
            if not negotiating[source]:
                del negotiating[source]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.buffer_updated(nbytes)
        if conn.buffered >= max(INPUT_HIGH, conn.wanted) and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        if self._running and not self.server.draining:  # the task is in a group: plan for it
            self._plan()
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
            self._negotiated()
            if self._transmitting:
                self.server.transmitting -= 1
            self._drop_twin()
            self.server.connections.discard(self)
            self.server.metrics.connections.dec()
            if self.transport is not None:
                self.transport.close()

    async def _serve(self) -> None:
        conn, server, ready = self.conn, self.server, self._ready
        turn = time.perf_counter()  # when this task last let the loop run others
        try:
            while not self.lost:
                self._plan()
                if ready:
                    blocks = self.blocks
                    assert blocks is not None
                    group, plan = ready.popleft()
                    started = time.perf_counter()
                    self._running = True
                    try:
                        answers = await server.execute(blocks, group, plan)
                    finally:
                        self._running = False
                    self._send(answers)
                    server.count(blocks.export.name, answers, time.perf_counter() - started)
                    turn = await self._next_turn(turn)
                    continue
                self._write(conn.data_to_send())
                last = self._last
                if isinstance(last, Closed):
                    level = logging.WARNING if last.violation else logging.INFO
                    log_event("nbd_disconnected", level, peer=self.peer, reason=last.reason)
                    return
                if isinstance(last, StartTls):
                    self._last = None
                    if not await self._start_tls():
                        return
                    continue
                if conn.held_back:  # more input waits to be parsed, once the output drains
                    turn = await self._next_turn(turn)
                    continue
                if server.draining:  # every request received has had its answer
                    return
                await self._wait()
            log_event("nbd_connection_lost", peer=self.peer)
        finally:
            for _, plan in ready:
                if plan is not None:
                    plan.drop()
            ready.clear()

    async def _next_turn(self, turn: float) -> float:
        """Before the task goes on: wait while the transport holds OUTPUT_HIGH of replies, and
        let the loop run other work if this task has run for TURN_SECONDS since `turn` (groups
        served inline and the machine's own replies never suspend it): the new turn."""
        if self._writing_paused:
            while self._writing_paused and not self.lost:
                await self._wait()
            return time.perf_counter()  # the wait let the others run
        if time.perf_counter() - turn <= TURN_SECONDS:
            return turn
        await asyncio.sleep(0)
        return time.perf_counter()

    def _plan(self) -> None:
        """Take the requests parsed, while few groups wait, and plan groups up to
        AHEAD_GROUPS (a WRITE group's encoding starts): from the task before each group, and
        from buffer_updated() while the task is in one, so what arrives meanwhile reaches the
        codec workers at once rather than when the group is done."""
        conn, waiting, ready = self.conn, self._waiting, self._ready
        if self._last is None and not waiting and len(ready) < AHEAD_GROUPS:
            requests, self._last = self._take()
            waiting.extend(groups(requests))
            resume = conn.buffered < max(INPUT_LOW, conn.wanted)  # a partial payload must grow
            if self._reading_paused and resume and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
        while waiting and len(ready) < AHEAD_GROUPS:
            assert self.blocks is not None
            group = waiting.popleft()
            ready.append((group, self.blocks.plan(group, start=True)))

    def _take(self) -> tuple[list[Request], Closed | StartTls | None]:
        """The requests the input holds (up to BATCH_REQUESTS), and the event that ended the
        haul if it must be handled after them (Closed, StartTls)."""
        conn = self.conn
        requests: list[Request] = []
        while len(requests) < BATCH_REQUESTS:
            event = conn.next_event()
            if isinstance(event, Request):
                requests.append(event)
            elif isinstance(event, Closed | StartTls):
                return requests, event
            elif isinstance(event, Negotiated):
                self._negotiated()
                server = self.server
                if server.transmitting >= server.max_connections:
                    self._drop("limit", f"{server.max_connections} connections are served already")
                    return requests, None
                server.transmitting += 1
                self._transmitting = True
                self.blocks = server.exports[event.export.name]
                export = event.export.name
                log_event("nbd_connected", peer=self.peer, export=export, client=self.client)
            elif isinstance(event, Rejected):
                assert self.blocks is not None
                name = self.blocks.export.name
                log_event(
                    "nbd_request_rejected",
                    logging.DEBUG,
                    peer=self.peer,
                    export=name,
                    why=event.reason,
                )
                self.server.metrics.rejected.labels(name, event.error.name).inc()
            else:  # NEED_DATA
                break
        return requests, None

    def _send(self, answers: list[Answer]) -> None:
        conn = self.conn
        parts: list[bytes | memoryview] = [conn.data_to_send()]  # the machine's rejections first
        for request, error, data in answers:
            conn.send_to(parts, request, error, data)
        transport = self.transport
        if self.lost or transport is None:
            return
        sock, idle = self._sock, not transport.get_write_buffer_size()
        if sock is not None and idle and not transport.is_closing():
            parts = self._send_now(sock, parts)
        if parts:
            transport.writelines(parts)

    @staticmethod
    def _send_now(sock: socket.socket, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """Send what the socket takes at once straight from `parts` (one sendmsg, no join);
        the parts or pieces of parts it did not take, for the transport.  Only while the
        transport holds nothing unsent, so bytes keep their order; an error is left for the
        transport's own send to meet (and close the connection on)."""
        try:
            sent = sock.sendmsg(parts[:IOV_MAX])
        except OSError:  # would block, interrupted, reset: the transport takes it all
            return parts
        for at, part in enumerate(parts):
            size = len(part) if type(part) is bytes else memoryview(part).nbytes
            if sent < size:
                rest = parts[at:]
                if sent:
                    rest[0] = memoryview(part).cast("B")[sent:]
                return rest
            sent -= size
        return []

    def _drop_twin(self) -> None:
        if self._sock is not None:
            self._sock.close()  # closes the duplicate descriptor only
            self._sock = None

    def _write(self, data: bytes) -> None:
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)

    async def _start_tls(self) -> bool:
        """Upgrade to TLS right after the ACK went out (nothing is read in between); False if
        the handshake failed, which ends the connection."""
        assert self.transport is not None and self.server.tls is not None
        self._drop_twin()  # from now on every byte goes through TLS
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
        self.client = client_name(transport)
        self.conn.tls_started(self.server.visible(self.client))
        log_event("nbd_tls_started", logging.DEBUG, peer=self.peer, client=self.client)
        return True


def source_of(transport: asyncio.BaseTransport) -> str:
    """Whom a negotiating connection counts against: its IPv4 address, its IPv6 address's /64
    (what one host or site is usually given, so one host cannot take a slot per address), or
    on a Unix socket the connecting process's user (SO_PEERCRED)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:  # not an IP address: counted by what it is
            return peer[0]
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        return f"uid {PEERCRED.unpack(creds)[1]}"
    return "unknown"
