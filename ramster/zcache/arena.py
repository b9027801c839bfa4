# Pageframe arena: the frames every allocator of one zcache carves zpages from.
#
# One anonymous private mmap is reserved for the whole capacity; the kernel backs a frame with
# RAM only once it is written.  Frames are handed out from a free stack (most recently freed
# first, so hot frames are reused) and, above it, from a high-water mark that grows into untouched
# address space.  A freed frame is given back with madvise(MADV_DONTNEED), so the process's RSS
# follows the frames in use rather than the peak; but the last frames freed, up to WARM (or a
# 64th of the capacity, if less, and never under MIN_WARM), are kept as they are and handed out
# first, since churn (an overwrite frees the zspages of the pages it replaces while it fills new
# ones) would otherwise pay a syscall to give each frame back and a fault to zero it again
# moments later (~0.3 frames per rewritten page; measured on rewrites of 8192 gcc pages: filing
# 5.9 -> 5.0 us a page).  A batch frees what it replaces before it stores, so the warm frames
# must cover a batch: with 64 of them, an NBD rewrite of incompressible pages (a raw page fills
# a frame: a frame per page) gave back and faulted in again 116,000 frames per GiB, and with
# 1024 it moved 1.5x the MiB/s.  Trade-off: up to WARM frames (4 MiB) of RSS above the frames in
# use, holding freed bytes until they are reused or a caller that knows traffic has paused
# cools the arena (cool(): the NBD server does, node/nbd/server.py).
#
# Untouched frames are faulted in ahead, POPULATE at a time, with one madvise(MADV_POPULATE_WRITE)
# as the high-water mark reaches them: one page fault per frame written costs about twice as much
# CPU (2.2 against 1.4 us a frame, measured), a third of a microsecond per stored page.  The RSS
# then runs at most POPULATE - 1 frames ahead of the frames in use.  Kernels older than 5.14 do
# not know the advice: the arena then lets frames fault in one by one.
#
# A native filing of a put batch borrows frames LEND at a time (lend) and gives back what
# it did not use (give_back, to the warm stack, which may then exceed WARM by that much until
# they are taken again).
#
# Trade-off: one reservation of `capacity` frames costs address space, not memory; it keeps frame
# -> address arithmetic a single multiply, which the hot paths of the allocators rely on.
from __future__ import annotations

import mmap
from array import array

from ramster.zcache.codec import PAGE_SIZE
from ramster.zcache.errors import InvalidConfig

POPULATE = 16  # untouched frames faulted in at once
WARM = 1024  # freed frames kept faulted in, for reuse first (a big NBD group's 4 times) ...
MIN_WARM = 64  # ... at most a 64th of the capacity, but at least this many
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.13 names it


class Arena:
    """Fixed-capacity pool of 4096-byte frames in one anonymous mapping."""

    def __init__(self, capacity_frames: int) -> None:
        if capacity_frames < 1:
            raise InvalidConfig(f"arena capacity must be at least 1 frame, got {capacity_frames}")
        self.capacity = capacity_frames
        self.map = mmap.mmap(-1, capacity_frames * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
        self.view = memoryview(self.map)
        self._free = array("I")  # given back to the OS
        self._warm = array("I")  # still faulted in
        self._warm_max = max(MIN_WARM, min(WARM, capacity_frames // 64))
        self._high = 0
        self._populated = 0  # frames below it are faulted in (or left to fault: see _populate)
        self.in_use = 0
        self.limit = capacity_frames

    def alloc(self) -> int:
        """A free frame number, or -1 when the arena (or its current limit) is full."""
        if self.in_use >= self.limit:
            return -1
        self.in_use += 1
        if self._warm:
            return self._warm.pop()
        if self._free:
            return self._free.pop()
        frame = self._high
        self._high = frame + 1
        if frame >= self._populated:
            self._populate(frame)
        return frame

    def lend(self, frames: list[int], n: int) -> None:
        """Append up to `n` free frames to `frames` (fewer at the limit, none when full), the
        one alloc() would hand out first last: lent to a native filing (native/slots.rs), which
        takes them from the end; the rest comes back through give_back()."""
        n = max(0, min(n, self.limit - self.in_use))
        warm = min(n, len(self._warm))
        free = min(n - warm, len(self._free))
        fresh = n - warm - free
        if fresh:
            start = self._high
            self._high = start + fresh
            while self._populated < self._high:
                self._populate(self._populated)
            frames += range(self._high - 1, start - 1, -1)
        for stack, take in ((self._free, free), (self._warm, warm)):
            if take:
                frames += stack[-take:]
                del stack[-take:]
        self.in_use += n

    def give_back(self, frames: list[int]) -> None:
        """Frames from lend() that were not used, the one to hand out next last: kept
        warm (they may have been faulted in), so the next alloc() takes them first."""
        self._warm.extend(frames)
        self.in_use -= len(frames)

    def _populate(self, frame: int) -> None:
        """Fault in POPULATE untouched frames from `frame` on (fewer at the end of the map)."""
        end = self._populated = min(self.capacity, frame + POPULATE)
        try:
            self.map.madvise(MADV_POPULATE_WRITE, frame * PAGE_SIZE, (end - frame) * PAGE_SIZE)
        except OSError:  # an older kernel: frames fault in as they are written, never ask again
            self._populated = self.capacity

    def free(self, frame: int) -> None:
        """Return a frame to the arena, and its memory to the OS unless it is kept warm."""
        self.free_many([frame])

    def free_many(self, frames: list[int]) -> None:
        """free() of each of `frames`, in order: the first kept warm while there is room."""
        warm = max(0, min(len(frames), self._warm_max - len(self._warm)))
        self._warm.extend(frames[:warm])
        for frame in frames[warm:]:
            self.map.madvise(mmap.MADV_DONTNEED, frame * PAGE_SIZE, PAGE_SIZE)
        self._free.extend(frames[warm:])
        self.in_use -= len(frames)

    def cool(self) -> int:
        """Give the warm frames' memory back to the OS (they stay free): for a caller that knows
        traffic has paused, so the RSS follows the frames in use again.  How many went."""
        warm, cooled = self._warm, len(self._warm)
        for frame in warm:
            self.map.madvise(mmap.MADV_DONTNEED, frame * PAGE_SIZE, PAGE_SIZE)
        self._free.extend(warm)
        del warm[:]
        return cooled

    def metadata_bytes(self) -> int:
        return (len(self._free) + len(self._warm)) * self._free.itemsize

    def close(self) -> None:
        self.view.release()
        self.map.close()
