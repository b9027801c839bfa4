# Recency list over small integer ids, kept in arrays instead of one object per entry.
#
# Allocators number their reclaimable units (a zbud page, a zspage, a raw frame) with dense ids;
# this list threads those ids through `prev`/`next` arrays with a sentinel at id 0 (16 bytes per
# unit, no Python object).  Every use of a unit stores the zcache-wide tick in `tick[uid]`: one
# array store on the hot path, no relinking.  The list itself is ordered by `queued[uid]`, the tick
# at which the unit was last (re)linked at the head, and is put right lazily: `oldest()` looks at
# the tail and, if the tail was used after it was queued, moves it back to the head and looks
# again ("second chance" with exact timestamps).  So the unit returned is one not used since it was
# queued, and no unit younger than it is skipped on its account: LRU order for the reaper, at the
# cost of hot paths that never touch the links.
#
# Ticks also let the reaper compare the oldest units of different allocators.
from __future__ import annotations

from array import array
from collections.abc import Iterator


class LruList:
    """Doubly linked recency list: head side is most recent, tail side least recent."""

    def __init__(self) -> None:
        self.prev = array("q", [0])
        self.next = array("q", [0])
        self.tick = array("Q", [0])
        self.queued = array("Q", [0])

    def grow(self, size: int) -> None:
        """Make ids below `size` (id 0 is the sentinel) addressable."""
        extra = size - len(self.prev)
        if extra > 0:
            zeros = bytes(8 * extra)
            for arr in (self.prev, self.next, self.tick, self.queued):
                arr.frombytes(zeros)

    def push(self, uid: int, tick: int) -> None:
        """Insert `uid` as the most recent entry."""
        nxt = self.next
        first = nxt[0]
        self.prev[uid] = 0
        nxt[uid] = first
        self.prev[first] = uid
        nxt[0] = uid
        self.tick[uid] = self.queued[uid] = tick

    def remove(self, uid: int) -> None:
        prv, nxt = self.prev, self.next
        p, n = prv[uid], nxt[uid]
        nxt[p] = n
        prv[n] = p

    def oldest(self) -> int:
        """Least recently used id (after requeueing tails used since queued), or 0 when empty."""
        tick, queued = self.tick, self.queued
        uid = self.prev[0]
        while uid and tick[uid] != queued[uid]:
            self.remove(uid)
            self.push(uid, tick[uid])
            uid = self.prev[0]
        return uid

    def __iter__(self) -> Iterator[int]:
        """Ids in list order, tail (least recently queued) first."""
        uid = self.prev[0]
        while uid:
            yield uid
            uid = self.prev[uid]

    def metadata_bytes(self) -> int:
        return sum(
            a.buffer_info()[1] * a.itemsize for a in (self.prev, self.next, self.tick, self.queued)
        )
