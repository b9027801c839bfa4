# Giving freed heap memory back to the OS after bursts of zpage traffic.
#
# Zpages cross a node as bytes objects of 1-4 KiB (the outbox, fetched copies, request and reply
# buffers of up to a few MiB).  glibc's malloc serves them from its heaps and keeps what is freed
# there: freed chunks between live ones are never returned, and after a big buffer is freed the
# mmap threshold rises, so the next big buffers land in the heap too.  After a stream of
# evictions the owner's RSS kept tens of MiB the outbox had used, which made a remote page look
# several times dearer than its table entry (measured: 324 -> 116 bytes per remote page at
# 128,000 remote pages after one trim; holders +150 -> +90 bytes per copy).
#
# HeapTrimmer calls malloc_trim(0), which gives back every free page of every heap, when the
# node is quiet after moving a lot: at least TRIM_AFTER zpages went through the layer (sent,
# fetched, held for peers) since the last trim and none moved in the last check interval.  The
# trim runs in a worker thread (ctypes releases the GIL) and is skipped where there is no glibc
# (musl, macOS); the owner's `quiet` callback, which lets go of its own caches, runs at the same
# moment either way.
#
# The layer of a clustered node runs one (node/cluster.py), and so does the NBD server
# (node/nbd/server.py), whose write groups are zpages made and freed once filed: after a 1 GiB
# nbdcopy of real memory pages a node held 1.5 MiB more heap than a trim left.  trim_heap()
# trims once, at once: the node calls it after startup, when the garbage of imports and setup
# has been collected (~1 MiB an idle node no longer holds).
#
# Trade-off: a trim walks the heaps holding each arena's lock, a few ms to tens of ms on a
# fragmented heap, during which mallocs of the loop thread wait; trimming only when traffic
# has paused keeps that off the busy path, and trimming after every TRIM_AFTER zpages keeps each
# trim small.
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable

TRIM_AFTER = 8192  # zpages moved between trims (about the outbox's bound: 16 MiB)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def trim_heap() -> None:
    """Give every free page of the heap back to the OS now (nothing without glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HeapTrimmer:
    """Trims the heap when `moved()` (a running count of zpages) has grown by TRIM_AFTER since
    the last trim and stood still for one `interval`, first calling `quiet()` (on the loop), which
    lets go of whatever else the burst left cached."""

    def __init__(
        self, moved: Callable[[], int], interval: float, quiet: Callable[[], None] | None = None
    ) -> None:
        self.moved = moved
        self.interval = interval
        self.quiet = quiet
        self.trims = 0
        self.seconds = 0.0
        self._trim = _malloc_trim()

    async def run(self) -> None:
        if self._trim is None and self.quiet is None:
            return  # nothing to do: no glibc to trim, no cache to let go of
        trimmed_at = last = self.moved()
        while True:
            await asyncio.sleep(self.interval)
            now = self.moved()
            if now == last and now - trimmed_at >= TRIM_AFTER:
                if self.quiet is not None:
                    self.quiet()
                if self._trim is not None:
                    await asyncio.to_thread(self.trim)
                trimmed_at = now
            last = now

    def trim(self) -> None:
        if self._trim is not None:
            started = time.perf_counter()
            self._trim(0)
            self.trims += 1
            self.seconds += time.perf_counter() - started
