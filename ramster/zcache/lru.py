# Recency of reclaimable units, exact LRU with a one-store touch.
#
# Allocators number their reclaimable units (a zbud page, a zspage, a raw frame) with dense ids.
# Every use of a unit stores the zcache-wide tick in `tick[uid]`: one array store on the hot path,
# no list to relink.  The reaper finds the least recently used unit with a lazy min-heap: each live
# unit has one heap entry `queued << 32 | uid`, where `queued[uid]` <= `tick[uid]` is the tick it
# was (re)inserted with.  `oldest()` looks at the heap top; an entry whose unit was freed or
# re-queued since is dropped, and an entry whose unit was used since it was queued is re-queued
# with its current tick.  The first entry that is neither is exactly the least recently used unit:
# every other unit has queued >= its tick and tick >= queued.  So touches stay O(1) stores and all
# ordering work is paid, O(log n) per unit, only when memory is actually reclaimed.
#
# Ticks also let the reaper compare the oldest units of different allocators.
from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterator

_UID_BITS = 32
_UID_MASK = (1 << _UID_BITS) - 1


class LruList:
    """Exact least-recently-used order over unit ids (id 0 is never used)."""

    def __init__(self) -> None:
        self.tick = array("Q", [0])
        self.queued = array("Q", [0])  # 0: not live
        self._heap: list[int] = []
        self.live = 0

    def grow(self, size: int) -> None:
        """Make ids below `size` addressable."""
        extra = size - len(self.tick)
        if extra > 0:
            zeros = bytes(8 * extra)
            self.tick.frombytes(zeros)
            self.queued.frombytes(zeros)

    def push(self, uid: int, tick: int) -> None:
        """Make `uid` live, used at `tick` (ticks start at 1)."""
        self.tick[uid] = self.queued[uid] = tick
        heapq.heappush(self._heap, tick << _UID_BITS | uid)
        self.live += 1

    def remove(self, uid: int) -> None:
        """`uid` is no longer live; its heap entry goes stale."""
        self.queued[uid] = 0
        self.live -= 1
        if len(self._heap) > 2 * self.live + 64:
            self._heap = [q << _UID_BITS | i for i, q in enumerate(self.queued) if q]
            heapq.heapify(self._heap)

    def oldest(self) -> int:
        """The least recently used live id, or 0 when there is none."""
        heap, tick, queued = self._heap, self.tick, self.queued
        while heap:
            top = heap[0]
            uid = top & _UID_MASK
            q = top >> _UID_BITS
            if queued[uid] != q:
                heapq.heappop(heap)
            elif tick[uid] != q:
                queued[uid] = tick[uid]
                heapq.heapreplace(heap, tick[uid] << _UID_BITS | uid)
            else:
                return uid
        return 0

    def __iter__(self) -> Iterator[int]:
        """Every live id, in no particular order."""
        return (uid for uid, q in enumerate(self.queued) if q)

    def metadata_bytes(self) -> int:
        heap = self._heap.__sizeof__() + sum(e.__sizeof__() for e in self._heap)
        return heap + sum(a.buffer_info()[1] * a.itemsize for a in (self.tick, self.queued))
