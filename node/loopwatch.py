# Event-loop stall meter: a task that asks to wake every `interval` and records how late it woke.
# Lateness is time the loop spent on something else without yielding (an engine chunk, a big
# message's (de)serialisation), which is exactly the wait a small RPC can suffer behind it.
# The worst value is kept for the shutdown log, a stall over `report_after` is logged as it
# happens (so an operator can line it up with what the node was doing), and each value feeds a
# histogram.
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from node.logs import log_event


class LoopWatch:
    def __init__(
        self, observe: Callable[[float], None], interval: float = 0.01, report_after: float = 0.05
    ) -> None:
        self.observe = observe
        self.interval = interval
        self.report_after = report_after
        self.max_stall = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loopwatch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            stall = max(0.0, loop.time() - before - self.interval)
            self.max_stall = max(self.max_stall, stall)
            self.observe(stall)
            if stall > self.report_after:
                log_event("loop_stall", logging.WARNING, stall_ms=round(stall * 1000, 3))
