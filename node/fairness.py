# Per-connection fairness for bulk work: one connection cannot starve another's calls.
#
# The event loop runs ready tasks in turn and a batch yields after every slice, so each running
# batch gets an equal share of the loop, whoever sent it.  Left at that, a client that opens many
# streams, or fires many batch calls at once, gets a share per batch and crowds out a client with
# one stream (and a single get waits behind one slice of every batch running).  PeerTurns caps
# what one connection (gRPC's peer address; each client process has its own) runs at once; its
# further batches wait their turn in arrival order (asyncio.Semaphore is FIFO) without touching
# the loop.  Small calls (single pages, health, stats) take no turn: they are one slice already.
#
# Trade-off: a peer's queue lives only while it has a batch running or waiting, so the table
# stays as small as the set of busy connections; a client behind a proxy that multiplexes many
# users on one connection gets one connection's share.
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PeerTurns:
    """At most `limit` batches at once per peer; the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._peers: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def turn(self, peer: str) -> AsyncIterator[None]:
        gate, users = self._peers.get(peer) or (asyncio.Semaphore(self.limit), 0)
        self._peers[peer] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._peers[peer]
            if users == 1:
                del self._peers[peer]
            else:
                self._peers[peer] = (gate, users - 1)

    @property
    def peers(self) -> int:
        """Connections with a batch running or waiting."""
        return len(self._peers)
