# Event-loop stall meter: every `interval` a watchdog thread posts a callback to the loop and the
# callback records how long it waited to run.  That wait is what any event arriving from outside
# the loop (an RPC, a peer's heartbeat, a reply) waits before the loop looks at it: the time the
# loop spent on something else without yielding (an engine chunk, a big message's
# (de)serialisation), plus the wait for the GIL and for a core.  A timer set with asyncio.sleep
# would be late by up to a millisecond even on an idle loop (epoll rounds its timeout up to whole
# milliseconds), which is the very range the node's latency goals live in; posting from a thread
# has no such floor.  The thread waits for each answer before it posts again, so a loop stalled
# for seconds costs one late sample, not a pile of them.
#
# Each wait feeds `observe` (the node's histogram and worst-recent gauge), the worst value is kept
# for the shutdown log, and a stall over `report_after` is logged as it happens (so an operator
# can line it up with what the node was doing).  Trade-off: one thread waking 20 times a second
# and one loop callback per wake.  A probe costs ~0.36 ms of CPU on a virtual machine (two thread
# wake-ups, measured here; time.sleep(0.01) alone costs 0.08 ms a wake): at 100 probes a second
# the watch was 4.3% of a core on an idle node, 17 times all its other idle work, and 2.5% of a
# core under load; at 20 it is ~1%.  Stalls shorter than the interval may go unseen by the worst
# gauge, but every stall longer than report_after plus the interval is logged.
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from node.logs import log_event


class LoopWatch:
    def __init__(
        self, observe: Callable[[float], None], interval: float = 0.05, report_after: float = 0.05
    ) -> None:
        self.observe = observe
        self.interval = interval
        self.report_after = report_after
        self.max_stall = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch the running loop (call from it)."""
        loop = asyncio.get_running_loop()
        self._done.clear()
        self._thread = threading.Thread(
            target=self._probe, args=(loop,), name="loopwatch", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        if self._thread:
            self._done.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog thread: post, wait for the answer (or the stop), sleep, again."""
        while not self._done.wait(self.interval):
            answered = threading.Event()
            try:
                loop.call_soon_threadsafe(self._answer, time.perf_counter(), answered)
            except RuntimeError:  # the loop is closed
                return
            while not answered.wait(self.interval):
                if self._done.is_set():
                    return

    def _answer(self, posted: float, answered: threading.Event) -> None:
        """On the loop: how long the posted callback waited."""
        stall = time.perf_counter() - posted
        answered.set()
        self.max_stall = max(self.max_stall, stall)
        self.observe(stall)
        if stall > self.report_after:
            log_event("loop_stall", logging.WARNING, stall_ms=round(stall * 1000, 3))
