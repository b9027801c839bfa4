# Bulk work that gives its core away now and then, so the threads a small call wakes need not
# wait for the scheduler's tick.
#
# A process that streams pages in bulk (the node's loop filing and reading batches, a client
# feeding a stream) runs Python for milliseconds without a blocking system call.  A page fault's
# call meanwhile wakes about nine threads across two processes (gRPC's event engine, the grpc.aio
# poller, the event loops), and a thread woken onto the core of a busy one waits until the
# scheduler preempts it: with EEVDF that is once the busy thread's slice is spent, checked at the
# tick, so up to 4 ms on a kernel with HZ=250.  `perf sched` traces of `ramster bench latency` on 2
# cores put most of the single gets' waits over 1.5 ms behind the node's loop and the bulk client's,
# and their 99th percentile there.  CoreYield.now() calls sched_yield(), at most once every `every`
# seconds: with no thread waiting for the core it returns at once (~1 us), else the waiting threads
# run first, each for the short while a woken gRPC thread runs.  Trade-off: bulk work loses the
# core for that while, and pays a system call per `every` seconds of it (well under 1%).  Only
# bulk paths call it; a small call's own path never does, or it would hand its core away.
from __future__ import annotations

import os
import time
from collections.abc import Callable

YIELD_EVERY = 0.0002  # the longest bulk work keeps its core from a waiting thread (s), about


class CoreYield:
    """sched_yield() for bulk work, at most once every `every` seconds."""

    def __init__(
        self, every: float = YIELD_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every, self.clock = every, clock
        self.last = clock()

    def now(self) -> None:
        """Let threads waiting for this core run, unless this was done within `every`."""
        at = self.clock()
        if at - self.last >= self.every:
            self.last = at
            os.sched_yield()
