# Recency list over small integer ids, kept in arrays instead of one object per entry.
#
# Allocators number their reclaimable units (a zbud page, a zspage, a raw frame) with dense ids;
# this list threads those ids through `prev`/`next` arrays with a sentinel at id 0, so touching an
# entry is a handful of array stores and the memory cost is 16 bytes per unit.  Each entry also
# records the tick (a counter shared by the whole zcache) of its last use, which lets the reaper
# compare the oldest units of different allocators and pick the globally least recent one.
from __future__ import annotations

from array import array
from collections.abc import Iterator


class LruList:
    """Doubly linked recency list: head side is most recent, tail side least recent."""

    def __init__(self) -> None:
        self.prev = array("q", [0])
        self.next = array("q", [0])
        self.tick = array("Q", [0])

    def grow(self, size: int) -> None:
        """Make ids below `size` (id 0 is the sentinel) addressable."""
        extra = size - len(self.prev)
        if extra > 0:
            zeros = array("q", bytes(8 * extra))
            self.prev.extend(zeros)
            self.next.extend(zeros)
            self.tick.extend(array("Q", bytes(8 * extra)))

    def push(self, uid: int, tick: int) -> None:
        """Insert `uid` as the most recent entry."""
        nxt = self.next
        first = nxt[0]
        self.prev[uid] = 0
        nxt[uid] = first
        self.prev[first] = uid
        nxt[0] = uid
        self.tick[uid] = tick

    def remove(self, uid: int) -> None:
        prv, nxt = self.prev, self.next
        p, n = prv[uid], nxt[uid]
        nxt[p] = n
        prv[n] = p

    def touch(self, uid: int, tick: int) -> None:
        """Make `uid` the most recent entry."""
        if self.next[0] != uid:
            self.remove(uid)
            self.push(uid, tick)
        else:
            self.tick[uid] = tick

    def oldest(self) -> int:
        """Least recent id, or 0 when empty."""
        return self.prev[0]

    def __iter__(self) -> Iterator[int]:
        """Ids from least to most recent."""
        uid = self.prev[0]
        while uid:
            yield uid
            uid = self.prev[uid]

    def metadata_bytes(self) -> int:
        return sum(a.buffer_info()[1] * a.itemsize for a in (self.prev, self.next, self.tick))
