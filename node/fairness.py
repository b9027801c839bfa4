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
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


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
