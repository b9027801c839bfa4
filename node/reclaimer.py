# Reclaim in steps: the node's engine reclaims at most RECLAIM_STEP_FRAMES frames at a time, and
# this task goes on down to the low mark a step per loop turn.
#
# The engine reclaims from the put that hits the pool limit, down to the low mark (a tenth below
# the limit by default: zswap's hysteresis, so a full pool is not reclaimed a frame per put).  In
# one call that is a tenth of the pool evicted while everything else waits: measured, 150 ms for
# a 256 MiB pool, and the default pool is a quarter of RAM (6 GiB here: seconds), past the 1 s
# its peers wait for a heartbeat.  Now the put that hits the limit frees one step (1024 frames,
# ~25 ms of evictions), and the engine's on_reclaim wakes this task, which frees the rest a step
# at a time, yielding between steps (SmallFirst's bulk step where the node has one), so a small
# call waits behind one step, not the whole reclaim.  Puts that hit the limit meanwhile free
# their own step.  A step that frees nothing (the evictor is full, nothing is evictable) ends
# the run until the next limit hit.
#
# Trade-off: frames above the low mark are freed a few milliseconds later than before, so RSS
# falls over a few loop turns instead of at once; the pool never goes over its limit, as a put
# still frees its step first.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from node.logs import log_event
from ramster.zcache import ZCache, ZCacheError

RECLAIM_STEP_FRAMES = 1024  # frames one reclaim frees at most (4 MiB, ~25 ms of evictions)


class Reclaimer:
    def __init__(self, engine: ZCache, step: Callable[[], Awaitable[None]]) -> None:
        """Reclaim `engine` in steps, awaiting `step` between two."""
        self.engine = engine
        self.step = step
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        engine.reclaim_step = RECLAIM_STEP_FRAMES
        engine.on_reclaim = self._wanted.set

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop stepping; the engine reclaims down to the low mark in one go again."""
        self.engine.reclaim_step = self.engine.on_reclaim = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        engine = self.engine
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.step()
                while engine.reclaim_some():
                    self._wanted.clear()  # its own wake-up: this run goes on anyway
                    await self.step()
            except ZCacheError as exc:  # as a put that reclaims would meet it: the next try
                log_event("reclaim_failed", logging.ERROR, error=str(exc))
