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
# Ticks also order units across allocators.  LruHeap finds the least recently used unit over many
# lists (every allocator of every pool) with the same lazy trick one level up: one heap entry
# `key << 34 | list number` per non-empty list, where `key` is at most the tick of the list's
# oldest unit.  That bound stays valid while the list lives, because a list's oldest tick never
# goes down: units are only touched forward, and a new unit gets the newest tick.  A list that
# turns non-empty wakes the heap (`LruList.wake`), so empty lists cost nothing at all: finding the
# victim is O(log lists + log units) however many pools exist.  An entry whose key is stale is
# re-keyed; one whose list emptied or was dropped is removed.
from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

_UID_BITS = 32
_UID_MASK = (1 << _UID_BITS) - 1
_NO_BITS = 34  # list numbers: pool id (< 2**32) << 1 | which allocator
_NO_MASK = (1 << _NO_BITS) - 1

Owner = TypeVar("Owner")


class LruList:
    """Exact least-recently-used order over unit ids (id 0 is never used)."""

    def __init__(self) -> None:
        self.tick = array("Q", [0])
        self.queued = array("Q", [0])  # 0: not live
        self._heap: list[int] = []
        self.live = 0
        self.wake: Callable[[int], None] | None = None  # called with the tick when it fills

    def grow(self, size: int) -> None:
        """Make ids below `size` addressable."""
        extra = size - len(self.tick)
        if extra > 0:
            zeros = bytes(8 * extra)
            self.tick.frombytes(zeros)
            self.queued.frombytes(zeros)

    def push(self, uid: int, tick: int) -> None:
        """Make `uid` live, used at `tick` (ticks start at 1)."""
        if not self.live and self.wake is not None:
            self.wake(tick)
        self.tick[uid] = self.queued[uid] = tick
        heapq.heappush(self._heap, tick << _UID_BITS | uid)
        self.live += 1

    def remove(self, uid: int) -> None:
        """`uid` is no longer live; its heap entry goes stale."""
        self.queued[uid] = 0
        self.forget(1)

    def forget(self, count: int) -> None:
        """`count` ids are no longer live, their `queued` zeroed already (a native free)."""
        self.live -= count
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


class LruHeap(Generic[Owner]):
    """The least recently used unit over many LruLists, each numbered and with an owner."""

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._lists: dict[int, tuple[LruList, Owner]] = {}
        self._queued: set[int] = set()  # numbers with an entry in the heap
        self.inspected = 0  # lists looked at while finding victims (the work done)

    def add(self, no: int, lru: LruList, owner: Owner) -> None:
        """Track list `no` (0 <= no < 2**34); a number may be reused after `discard`."""
        if not 0 <= no <= _NO_MASK:
            raise ValueError(f"list number {no} is out of range")
        self._lists[no] = (lru, owner)
        lru.wake = lambda tick: self._wake(no, tick)
        uid = lru.oldest()
        if uid:
            self._wake(no, lru.tick[uid])

    def discard(self, no: int) -> None:
        """Stop tracking list `no`; its heap entry is dropped when it comes up."""
        entry = self._lists.pop(no, None)
        if entry is not None:
            entry[0].wake = None

    def _wake(self, no: int, tick: int) -> None:
        # An entry still queued for `no` has a key below `tick`: it stays a valid bound.
        if no not in self._queued:
            self._queued.add(no)
            heapq.heappush(self._heap, tick << _NO_BITS | no)

    def oldest(self) -> tuple[int, Owner, int] | None:
        """(tick, owner, unit id) of the least recently used unit of every list, or None."""
        heap, lists = self._heap, self._lists
        while heap:
            top = heap[0]
            no = top & _NO_MASK
            self.inspected += 1
            entry = lists.get(no)
            uid = entry[0].oldest() if entry is not None else 0
            if entry is None or not uid:
                heapq.heappop(heap)
                self._queued.discard(no)
                continue
            lru, owner = entry
            tick = lru.tick[uid]
            if tick != top >> _NO_BITS:
                heapq.heapreplace(heap, tick << _NO_BITS | no)
            else:
                return tick, owner, uid
        return None
