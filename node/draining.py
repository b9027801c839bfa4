# Long-lived request streams that a graceful stop ends: Tmem.Pages (a client's page calls) and
# Peer.FetchZpages (an owner's fetches) stay open as long as their caller, so they would hold a
# drain for its whole grace.  Their handlers read each request through `Drain.next()`; `drain()`
# ends them: a handler awaiting a request now (its read is cancelled, which gRPC allows), one
# serving a request once its reply is written, and a stream opened later at its first read.  The
# handler then ends its call with UNAVAILABLE, as a unary call arriving now would.
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self._reading: set[asyncio.Task[object]] = set()  # handlers awaiting a request

    async def next(self, requests: AsyncIterator[T]) -> T | None:
        """The stream's next request; None once its caller ended it or the node drains
        (`draining` tells which)."""
        if self.draining:
            return None
        task = asyncio.current_task()
        assert task is not None
        self._reading.add(task)
        try:
            return await anext(requests)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self.draining:  # the call was cancelled, not ended by drain()
                raise
            task.uncancel()
            return None
        finally:
            self._reading.discard(task)

    def drain(self) -> None:
        """End every stream read through next()."""
        self.draining = True
        for task in self._reading:
            task.cancel()
