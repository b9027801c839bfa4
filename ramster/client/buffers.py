# Keep big message buffers in the process: a glibc malloc tuning for processes that move
# multi-megabyte gRPC messages (nodes, and clients that send big batches).
#
# A 4 MiB batch is copied a few times on its way (transport buffer, Python bytes, protobuf
# field, page slices).  By default glibc serves such sizes with fresh mmap()s, or trims the heap
# top after they are freed, so every batch pays page faults and zeroing of memory it just had:
# on a loaded 2-core machine that was ~25% of a node's CPU.  Raising the mmap and trim thresholds
# (and padding heap growth) lets freed buffers be reused warm.  The cost is that up to ~256 MiB
# of freed memory may stay resident; the page arena is an mmap of its own and unaffected.  On a
# libc without mallopt (musl, macOS) this does nothing.
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Apply the tuning; whether this libc took it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
