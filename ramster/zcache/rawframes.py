# Raw frames: one incompressible page per frame, for the store-raw policy.
#
# A raw zpage is the 18-byte header plus 4096 bytes of page, which fits neither a zbud half nor a
# zsmalloc class.  Rather than a two-frame class that wastes half of it, the page fills one frame
# and its header lives beside it in a list; raw pages are the exception (incompressible data under
# an opt-in policy), so a Python object per page is affordable here and nowhere else.  alloc()
# takes exactly that shape (RAW_ZPAGE bytes) and refuses any other with InvalidPage before it
# takes a frame.
#
# A put batch files a run of raw zpages, and frees a run of raw handles, in one native call
# (file_run, free_run: native/raw.rs), as a block device's export of incompressible data is
# nearly all raw pages: one by one, in Python, they bound an NBD rewrite at the event loop's
# 1.0 CPU-s per GiB.  The native calls change the tables in place but never their size: the ids
# they may use are handed in (_spare_ids grows the tables for new ones) and the ones a free
# leaves go back here, with the counts and the frames (Arena.free_many).
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from typing import Any

from ramster.zcache._codec import raw_file, raw_free
from ramster.zcache.allocator import Extent, File, FreeMany, MoveCallback, Walk, array_bytes
from ramster.zcache.arena import Arena
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE
from ramster.zcache.errors import InvalidPage
from ramster.zcache.halves import Encodings
from ramster.zcache.lru import LruList

RAW_ZPAGE = HEADER_SIZE + PAGE_SIZE


class RawFrames:
    name = "raw"
    walk: Walk | None = None  # gets walk its handles in Python; the zpage allocators' batch
    file: File | None = None  # paths are not this one's: a put batch files and frees runs of
    free_many: FreeMany | None = None  # raw pages with file_run() and free_run()
    compactable = 0  # never: see compact()
    on_compactable: Callable[[], None] | None = None

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.lru = LruList()
        self.unit_shift = 0  # unit id = handle >> unit_shift
        self.frame = array("I", [0])
        self.header: list[bytes] = [b""]
        self._free_ids = array("I")
        self.zpages = 0
        self.frames = 0

    def alloc(self, zpage: bytes, tick: int) -> int:
        if len(zpage) != RAW_ZPAGE:
            raise InvalidPage(f"a raw zpage is {RAW_ZPAGE} bytes, got {len(zpage)}")
        frame = self.arena.alloc()
        if frame < 0:
            return -1
        if self._free_ids:
            rid = self._free_ids.pop()
            self.frame[rid] = frame
            self.header[rid] = zpage[:HEADER_SIZE]
        else:
            rid = len(self.frame)
            self.frame.append(frame)
            self.header.append(zpage[:HEADER_SIZE])
            self.lru.grow(rid + 1)
        base = frame << 12
        self.arena.view[base : base + PAGE_SIZE] = zpage[HEADER_SIZE:]
        self.lru.push(rid, tick)
        self.zpages += 1
        self.frames += 1
        return rid

    def file_run(
        self,
        items: Encodings,
        first: int,
        tag: int,
        tick: int,
        stored: object,
        handles: list[int],
        results: list[Any],
    ) -> tuple[int, int]:
        """alloc() of the raw zpages of a put batch's encodings from `first` on, in a native
        call, each at the next tick: `tag` | its handle goes to `handles` and `stored` to
        `results`.  Where it stopped (at anything else, at the arena's limit, or at the first
        page of an empty LRU list, which the caller takes with alloc()) and the last tick."""
        if not self.lru.live:  # its first push wakes the LRU heap over all lists: alloc()'s
            return first, tick
        lent: list[int] = []  # frames the arena lends the native call
        spare = self._spare_ids(len(items) - first)
        try:
            first, tick, filed = raw_file(
                self, items, first, tag, tick, stored, handles, results, lent, spare
            )
        finally:
            if lent:
                self.arena.give_back(lent)
            self._free_ids.extend(spare)  # the next one on top, as it was
        self.zpages += filed
        self.frames += filed
        self.lru.live += filed
        return first, tick

    def free_run(self, handles: list[int], first: int, tag: int, mask: int) -> int:
        """free() of the raw zpages of `handles` (index handles: `tag` marks these, whose own
        handle is in the bits of `mask`) from `first` on, in a native call.  Where it stopped:
        the first handle of another kind, or the end."""
        frames: list[int] = []
        ids: list[int] = []
        try:
            return raw_free(self, handles, first, tag, mask, frames, ids)
        finally:  # what it freed before a bad handle stops it is given back all the same
            self.lru.forget(len(ids))
            self.arena.free_many(frames)
            self._free_ids.extend(ids)
            self.zpages -= len(ids)
            self.frames -= len(ids)

    def _spare_ids(self, n: int) -> list[int]:
        """`n` ids not in use, the one alloc() would take next last (a native filing takes
        from the end): the free ones first, then new ones, for which the tables grow."""
        free = self._free_ids
        take = min(n, len(free))
        spare = free[len(free) - take :].tolist()
        del free[len(free) - take :]
        new = n - take
        if new:
            start = len(self.frame)
            self.frame.frombytes(bytes(new * self.frame.itemsize))
            self.header += [b""] * new
            self.lru.grow(start + new)
            spare[:0] = range(start + new - 1, start - 1, -1)
        return spare

    def read(self, handle: int) -> bytes:
        base = self.frame[handle] << 12
        return self.header[handle] + self.arena.map[base : base + PAGE_SIZE]

    def locate(self, handle: int) -> int:
        return -1  # the header is held apart from the frame

    def free(self, handle: int) -> None:
        self.lru.remove(handle)
        self.arena.free(self.frame[handle])
        self.header[handle] = b""
        self._free_ids.append(handle)
        self.zpages -= 1
        self.frames -= 1

    def unit_handles(self, unit: int) -> list[int]:
        return [unit]

    def unit_frames(self, unit: int) -> int:
        return 1

    def compact(self, on_move: MoveCallback, enough: Callable[[], bool] | None = None) -> int:
        """A raw page fills its frame: nothing to compact."""
        return 0

    def extents(self) -> Iterator[tuple[int, list[Extent]]]:
        for rid in self.lru:
            yield rid, [(self.frame[rid], 0, PAGE_SIZE)]

    def owned_frames(self) -> set[int]:
        return {self.frame[rid] for rid in self.lru}

    def metadata_bytes(self) -> int:
        headers = self.header.__sizeof__() + sum(h.__sizeof__() for h in self.header)
        return array_bytes(self.frame, self._free_ids) + self.lru.metadata_bytes() + headers
