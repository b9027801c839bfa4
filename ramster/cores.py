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
# always, since a client cannot see another process's calls.  The node's steps yielding with no
# small call around cost bulk up to ~15% of its pages/s, so they do not.
#
# Measured with `ramster bench latency` (python-app-8k corpus, 2 shared cores, alternating runs,
# medians): loaded single-get p99 2.81 ms before, 1.94 after (5 runs each; 2.41-4.03 against
# 1.90-2.45), and 3.63 against 2.35 in 4 more on a busier machine; idle and loaded p50 alike.
# Bulk pages/s with 1 and 4 clients came out 5-9% lower in the first series and from 19% lower
# to 19% higher in the second, so no change stands out of the noise; bulk while loaded the same.
# A yield every 0.2 ms gave a loaded p99 of 2.04 ms against 2.69, and 0.1 ms beat 0.2 in 5 of 5
# head-to-head pairs (medians 1.88 and 2.10); 0.1 in the node with 0.2 in the client, 2.16
# against 2.63.
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
            if hasattr(os, "sched_yield"):  # not on Windows: there this does nothing
                os.sched_yield()
