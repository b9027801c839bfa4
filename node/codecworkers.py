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
# How: the pool's descriptor turns readable when jobs have finished; the loop watches it
# (add_reader), takes every finished job in one call and resolves their futures.  The reader is
# added on the loop of the first job and moved when a job comes from another loop (tests run a
# loop each).  A job whose future was cancelled (its batch was) still runs to its end, holding
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


class CodecWorkers:
    """`threads` native codec workers, driven from one event loop at a time."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = CodecPool(threads, CODEC_PREFIX + "_")
        self._waiting: dict[int, tuple[asyncio.Future[Any], Then]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def encode(
        self,
        encoder: PageEncoder,
        keys: Sequence[tuple[int, int]],
        pages: Sequence[bytes | memoryview],
    ) -> asyncio.Future[Encodings]:
        """encoder.encode(keys, pages) in a worker (a buffer of `pages` may hold a run of
        whole pages); every page must stay unwritten until done."""
        job = self._pool.encode(list(keys), list(pages), encoder.threshold, encoder.store_raw)
        return self._wait(job, _as_is)

    def open(self, sealed: SealedPages) -> asyncio.Future[SealedPages]:
        """sealed.open() in a worker."""
        job = self._pool.open(sealed.waiting_keys(), sealed.zpages, sealed.starts)
        return self._wait(job, sealed.place)

    def shutdown(self) -> None:
        """Stop the workers (after the jobs they are running) and fail what still waits."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._pool.fileno())
        self._loop = None
        self._pool.close()
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the codec workers were shut down"))

    def _wait(self, job: int, then: Then) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._pool.fileno())
            loop.add_reader(self._pool.fileno(), self._finished)
            self._loop = loop
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[job] = (future, then)
        return future

    def _finished(self) -> None:
        for job, result in self._pool.finished():
            future, then = self._waiting.pop(job)
            if future.done() or future.get_loop().is_closed():  # cancelled with its batch
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(then(result))


def _as_is(result: Any) -> Any:
    return result
