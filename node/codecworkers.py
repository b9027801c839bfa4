# The engine's codec workers: native threads (ramster.zcache's CodecPool, native/pool.rs) that
# encode put chunks and open get chunks without ever taking the GIL, their jobs finished as
# asyncio futures on the event loop.
#
# Why native threads: Python worker threads running the same native codec took the GIL three or
# four times per chunk (to leave the executor's queue, to make the chunk's bytes, to resolve its
# future) and waited for it each time the loop was running Python.  Measured on 1 GiB NBD
# sequential writes with one worker: the worker spent about a third of each chunk's time not
# running, and both cores were idle about a fifth of the time.  Here a job's inputs are taken on
# the loop when it is submitted, the worker codes them with the GIL never taken, and the loop
# makes the results when it takes the finished jobs.
#
# Two pools: `threads` encoders, at NICE (a lower priority than the loop's), and one opener at
# the process's priority.  The loop feeds the workers and files what they code, so when it is
# ready to run it should run: on 2 cores, with the encoders at nice 0 a second encoder moved
# 3-5% more NBD sequential writes than one, and at nice 10 8-19% (alternating runs); where
# nothing else competes, a lower priority costs them nothing.  Opens run one at a time, at the
# loop's priority: reads are bound by the loop, which waits for each hop it opens, and opens
# spread over two workers (or one at nice 10) took 6-12% off NBD sequential reads.
#
# How: a pool's descriptor turns readable when jobs have finished; the loop watches it
# (add_reader), takes every finished job in one call and resolves their futures.  The readers
# are added on the loop of the first job and moved when a job comes from another loop (tests run
# a loop each).  A job whose future was cancelled (its batch was) still runs to its end, holding
# its buffers until then; its result is dropped.  A job that failed in its worker resolves to
# the RuntimeError that says so, which the chunked engine raises as a CodecError.
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from node.threadcpu import CODEC_PREFIX
from ramster.zcache import Encodings, PageEncoder, SealedPages
from ramster.zcache._codec import CodecPool

Then = Callable[[Any], Any]  # what a job's result becomes, on the loop
NICE = 10  # the encoders' nice value above the process's (see the header)
ENCODERS, OPENER = 0, 1  # the pools, by their place in CodecWorkers._pools


class CodecWorkers:
    """`threads` native encoders and one opener, driven from one event loop at a time."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pools = (
            CodecPool(threads, CODEC_PREFIX + "_", NICE),
            CodecPool(1, CODEC_PREFIX + "r", 0),  # "ramster-codecr0": within Linux's 15 chars
        )
        # per pool, its jobs not finished yet (each pool numbers its own)
        self._waiting: tuple[dict[int, tuple[asyncio.Future[Any], Then]], ...] = ({}, {})
        self._loop: asyncio.AbstractEventLoop | None = None

    def encode(
        self,
        encoder: PageEncoder,
        keys: Sequence[tuple[int, int]],
        pages: Sequence[bytes | memoryview],
    ) -> asyncio.Future[Encodings]:
        """encoder.encode(keys, pages) in a worker (a buffer of `pages` may hold a run of
        whole pages); every page must stay unwritten until done."""
        pool = self._pools[ENCODERS]
        job = pool.encode(list(keys), list(pages), encoder.threshold, encoder.store_raw)
        return self._wait(ENCODERS, job, _as_is)

    def open(self, sealed: SealedPages) -> asyncio.Future[SealedPages]:
        """sealed.open() in the opener."""
        job = self._pools[OPENER].open(sealed.waiting_keys(), sealed.zpages, sealed.starts)
        return self._wait(OPENER, job, sealed.place)

    def pending(self) -> int:
        """Jobs submitted whose results the loop has not taken yet."""
        return sum(map(len, self._pools)) + sum(map(len, self._waiting))

    def shutdown(self) -> None:
        """Stop the workers (after the jobs they are running) and fail what still waits."""
        self._unwatch()
        self._loop = None
        for pool, waiting in zip(self._pools, self._waiting, strict=True):
            pool.close()
            left = list(waiting.values())
            waiting.clear()
            for future, _ in left:
                if not future.done():
                    future.set_exception(RuntimeError("the codec workers were shut down"))

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for pool in self._pools:
                self._loop.remove_reader(pool.fileno())

    def _wait(self, which: int, job: int, then: Then) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._unwatch()
            for at, pool in enumerate(self._pools):
                loop.add_reader(pool.fileno(), self._finished, at)
            self._loop = loop
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[which][job] = (future, then)
        return future

    def _finished(self, which: int) -> None:
        waiting = self._waiting[which]
        for job, result in self._pools[which].finished():
            future, then = waiting.pop(job)
            if future.done() or future.get_loop().is_closed():  # cancelled with its batch
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(then(result))


def _as_is(result: Any) -> Any:
    return result
