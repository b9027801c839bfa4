# Readahead for remote gets: a client that reads an object's pages in order (an NBD client
# reading a disk, a process faulting a region back in, a batch client walking a pool) has the
# remote copies of the pages after its request fetched while it is still busy with this one,
# as the kernel's swap readahead does, so its next request finds them staged instead of waiting
# for a round trip to a holder.
#
# A *stream* is one (pool, object).  A get continues its stream when it starts where the
# stream's last get ended and names consecutive pages; then, unless more than half a window is
# read ahead already, the pages up to `window` past it (the size of the get, at least RA_MIN and
# at most RA_MAX) are fetched in the background.  A get that starts elsewhere, before or after,
# moves the stream there without reading ahead, so random access costs nothing but this
# bookkeeping, and the sub-ranges the chunked engine prefetches again inside the get just
# counted neither move a stream nor read ahead.  A get whose first page is being read ahead
# waits for that fetch rather than fetching the same copies a second time.
#
# Trade-off: pages read ahead that no get asks for cost a fetch from a holder and a place among
# the staged copies; only a stream continued in order reads ahead, and a window is at most
# RA_MAX pages.
#
# Bounds: at most MAX_STREAMS streams are remembered (the oldest is dropped), at most
# MAX_RUNNING fetches run ahead at once (more are skipped, not queued), and what they fetch goes
# where a get's fetched copies go: the layer's staged copies, bounded and dropped oldest first.
# A fetch ahead that fails marks its holder failed, as any failed call does, and the get that
# needs the page fetches it itself.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

RA_MIN = 16
RA_MAX = 256
MAX_STREAMS = 64
MAX_RUNNING = 4

log = logging.getLogger("ramster.remote")
Keys = list[tuple[int, int]]


@dataclass
class _Stream:
    next: int  # where the stream's last get ended
    last: int  # where it began
    ahead_from: int = 0  # the pages [ahead_from, ahead_until) are being or were read ahead
    ahead_until: int = 0
    task: asyncio.Task[None] | None = None


class ReadAhead:
    def __init__(self, fetch: Callable[[int, Keys], Awaitable[object]]) -> None:
        self._fetch = fetch  # fetches the remote copies of (pool, keys) that are not local
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.pages = 0  # pages asked for ahead of a get

    def pending(self, pool: int, keys: Keys) -> asyncio.Task[None] | None:
        """The fetch ahead that covers the first page of `keys`, if it is still running."""
        stream = self._streams.get((pool, keys[0][0])) if keys else None
        if stream is None or stream.task is None or stream.task.done():
            return None
        return stream.task if stream.ahead_from <= keys[0][1] < stream.ahead_until else None

    def advance(self, pool: int, keys: Keys) -> None:
        """A get of `keys` was served: move its stream, and read ahead if it continues it."""
        if not keys:
            return
        (oid, start), (last_oid, last) = keys[0], keys[-1]
        if oid != last_oid or last - start != len(keys) - 1:
            return  # not a run of consecutive pages of one object
        end = last + 1
        stream = self._streams.get((pool, oid))
        if stream is None:
            while len(self._streams) >= MAX_STREAMS:
                del self._streams[next(iter(self._streams))]
            self._streams[(pool, oid)] = _Stream(end, start)
            return
        if start != stream.next:
            if not stream.last <= start < end <= stream.next:  # a jump, back or forth: the
                stream.next = stream.ahead_until = end  # stream starts over from here
                stream.last = start
            return  # (or a part of the get just counted: the chunked engine's re-checks)
        stream.next, stream.last = end, start
        window = min(max(len(keys), RA_MIN), RA_MAX)
        if stream.ahead_until - end > window // 2 or len(self._running) >= MAX_RUNNING:
            return  # enough is ahead yet (or too much is being read ahead already)
        first = max(end, stream.ahead_until)
        stream.ahead_from, stream.ahead_until = first, end + window
        ahead = [(oid, index) for index in range(first, end + window)]
        self.pages += len(ahead)
        task = asyncio.create_task(self._quietly(pool, ahead))
        stream.task = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _quietly(self, pool: int, keys: Keys) -> None:
        try:
            await self._fetch(pool, keys)
        except Exception as exc:  # the get that needs these pages fetches them itself
            log.info("reading %d pages ahead failed: %s", len(keys), exc)

    async def drain(self) -> None:
        """Until every fetch ahead running now is done."""
        await asyncio.gather(*self._running)

    def cancel(self) -> None:
        for task in self._running:
            task.cancel()
