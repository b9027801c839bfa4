# Per-client fairness for bulk work: one client cannot starve another's calls.
#
# A client is a tenant (node/tenants.py client_of: the tenant of the call's token, or without a
# tokens file its client address, the same unit --max-streams counts), not a connection, so a
# client that opens many connections or streams gets one share, not one per connection.
#
# The event loop runs ready tasks in turn and a batch yields after every slice, so each running
# batch gets an equal share of the loop, whoever sent it.  Left at that, a client that fires many
# batches at once gets a share per batch and crowds out a client with one batch (and a single get
# waits behind one slice of every batch running).  ClientTurns caps what one client runs in the
# engine at once; its further work waits its turn in arrival order (asyncio.Semaphore is FIFO)
# without touching the loop.  A turn covers one part of a batch (the servicer cuts every batch,
# unary or stream, into parts of at most PART_PAGES pages and takes a turn per part), so a
# 4096-page batch holds a turn for one part at a time and other work of the same client, queued
# meanwhile, runs between its parts.  Small calls (single pages, health, stats) take no turn:
# they are one slice already.
#
# Trade-off: a client's queue lives only while it has a part running or waiting, so the table
# stays as small as the set of busy clients; without tokens, clients behind one address (a NAT,
# or every process on one host) share one client's turns, as they share its stream limit.
#
# SmallFirst puts small calls ahead of bulk work on the loop.  Under bulk load a single get's time
# is mostly waiting for loop iterations: gRPC takes ~5 of them to bring a unary call to its
# handler (the call arrives, a task is made for it, its message is read), and every iteration
# also runs one step of each bulk task ready.  Measured on 2 cores, timing each get's stages from
# a probe process: the message-read hop, from the interceptor to the handler, took 0.46 ms at p50
# under load against 0.08 ms idle, and the hops before the interceptor 1.4 ms against 0.4.  So (1)
# while a small call is between the interceptor and the end of its handler, bulk steps wait, for
# at most HOLD (a call that never reaches its handler, cancelled in flight, stops counting HOLD
# after it arrived), and after a wait bulk runs at least as long as it waited before it waits
# again, so a flood of small calls from many clients takes at most half of bulk's time, never all
# of it; (2) for LATELY after a small call arrived, bulk goes through the engine in chunks of
# LATELY_CHUNK_PAGES instead of its usual size, so the iterations that carry the hops before the
# interceptor, which the node cannot see, are short (with codec workers too: bulk then leaves the
# workers for the loop, node/engine.py, as a worker's core is what the small calls' threads need).
# Trade-off: while small calls keep coming, bulk pays for the smaller chunks (more loop steps per
# page); without small calls nothing changes.  `ramster bench latency` (back-to-back gets against a
# bulk stream, 2 shared cores), by chunk: loaded/idle get p50 2.7-3.0 without SmallFirst, 1.7-2.0
# with 5 pages, 1.4-1.8 with 3, 1.4-1.6 with 2, 1.0-1.2 with 1; the bulk stream meanwhile moved
# 24-36k pages/s with 1 page, 30-46k without.  (Those numbers are of unary gets; AsyncClient's gets
# now travel on a Pages stream, where a get is one message read, announced to SmallFirst as it is
# read: see node/servicer.py.)  And (3) for LATELY after a small call arrived, bulk steps also give
# the loop thread's core to threads waiting for one (ramster.cores.CoreYield, at most every 0.1
# ms): the gRPC threads a call wakes, here and in its client, would otherwise wait up to a
# scheduler tick behind the busy loop.  Only then, since without small calls the yields help
# nobody and cost bulk up to ~15% of its pages/s (measurements in ramster/cores.py).
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from ramster.cores import CoreYield

HOLD = 0.002  # the longest a bulk step waits for small calls (s)
LATELY = 0.05  # bulk goes in small chunks for this long after a small call arrived (s)
LATELY_CHUNK_PAGES = 1  # the engine chunk of bulk work meanwhile (pages)


class ClientTurns:
    """At most `limit` parts at once per client; the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def turn(self, client: str) -> AsyncIterator[None]:
        gate, users = self._clients.get(client) or (asyncio.Semaphore(self.limit), 0)
        self._clients[client] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._clients[client]
            if users == 1:
                del self._clients[client]
            else:
                self._clients[client] = (gate, users - 1)

    @property
    def clients(self) -> int:
        """Clients with a part running or waiting."""
        return len(self._clients)


class SmallFirst:
    """Bulk steps give way to small calls being served; bulk chunks are small while small
    calls come."""

    def __init__(
        self,
        hold: float = HOLD,
        lately: float = LATELY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hold, self.lately, self.clock = hold, lately, clock
        self.pending = 0  # small calls arrived and not done, within `hold` of the latest
        self.arrived = clock() - lately  # when the latest small call arrived
        self.free_until = self.arrived  # bulk waits for no small call before this
        self._done = asyncio.Event()  # set while no small call is pending
        self.cores = CoreYield(clock=clock)  # gives waiting threads the core while calls come

    def arrive(self) -> None:
        """A small call reached the node (its interceptor, or a Pages request was read)."""
        now = self.clock()
        if now - self.arrived >= self.hold:
            self.pending = 0  # calls older than `hold` count no more (one may never finish)
        self.pending += 1
        self.arrived = now
        self._done.clear()

    def leave(self) -> None:
        """A small call's handler ended."""
        self.pending = max(0, self.pending - 1)
        if not self.pending:
            self._done.set()

    def coming(self) -> bool:
        """Whether small calls come: one arrived within `lately`."""
        return self.clock() - self.arrived < self.lately

    def chunk(self, usual: int) -> int:
        """The engine chunk for bulk work now: small while small calls come."""
        return min(usual, LATELY_CHUNK_PAGES) if self.coming() else usual

    async def bulk_step(self) -> None:
        """A bulk task's yield between steps: one loop step, then, while a small call is
        pending, until it is done (at most `hold`, and not again before bulk ran as long)."""
        await asyncio.sleep(0)
        start = self.clock()
        if start - self.arrived < self.lately:  # small calls come: their threads go first
            self.cores.now()
        left = self.hold - (start - self.arrived)
        if self.pending and left > 0 and start >= self.free_until:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), left)
            end = self.clock()
            self.free_until = end + (end - start)
