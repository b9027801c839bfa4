# Bulk work that gives its core away now and then, so the threads a small call wakes need not
# wait for the scheduler's tick.
#
# A process that moves pages in bulk (the node's loop filing and reading batches, a client feeding
# a batch stream) runs Python for milliseconds without blocking.  A page fault's call meanwhile
# wakes about nine threads across two processes (gRPC's event engine, the grpc.aio poller, the
# event loops), and a thread woken onto the core of a busy one waits until the scheduler preempts
# that one: with EEVDF once its slice is spent, which the tick checks, so up to 4 ms at HZ=250.
# `perf sched` traces of `scripts/get_stages.py` on 2 cores put most of the waits over 1.5 ms of
# the node's and probe's threads behind the node's loop, and, once that yielded, behind the bulk
# client's loop.  CoreYield.now() calls sched_yield() at most once every YIELD_EVERY: with no
# thread waiting for the core it returns at once (~1 us), else the waiting threads run first, a
# woken gRPC thread for tens of microseconds.  Bulk paths call it, a small call's never (it would
# hand its own core away): the node's bulk steps while small calls come (node/fairness.py), and a
# client's batch stream before each part it sends and after each reply (ramster/client/aio.py),
# always, since a client cannot see another process's calls; that cost no bulk pages/s measurably
# (`ramster bench latency`, 1, 2 and 4 clients), while the node's bulk yielding with no small call
# around cost up to ~15%.  0.1 and 0.2 ms measured alike.
from __future__ import annotations

import os
import time
from collections.abc import Callable

YIELD_EVERY = 0.0001  # the longest bulk work keeps its core from a waiting thread (s), about


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
