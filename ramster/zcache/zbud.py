# zbud: at most two zpages per pageframe ("buddies"), after Linux mm/zbud.c.
#
# A frame is split into 64 chunks of 64 bytes.  The first zpage is stored left-justified, the
# second right-justified, so the free space of a half-used frame is always one contiguous run in
# the middle.  Half-used ("unbuddied") frames sit in 65 lists indexed by their free chunks; a
# bitmask of non-empty lists turns "the tightest frame that still fits n chunks" into two integer
# ops.  Full ("buddied") frames are in no list.  Every frame is on an LRU list; reclaim of a frame
# evicts at most two zpages, which is zbud's selling point against zsmalloc's density.
#
# Unlike the kernel, the per-frame header (chunk counts, list links) lives in arrays outside the
# frame, so all 64 chunks hold data.  Handle = zbud id << 1 | side (0 = first, 1 = last).
# As zbud_alloc refuses an object larger than a frame with -ENOSPC, alloc() refuses a zpage that
# is empty or longer than a frame with InvalidPage before it touches any list or frame: written
# as-is it would run into the neighbouring frame.
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from ramster.zcache.allocator import Extent, File, FreeMany, MoveCallback, Walk, array_bytes
from ramster.zcache.arena import Arena
from ramster.zcache.codec import PAGE_SIZE
from ramster.zcache.errors import InvalidPage
from ramster.zcache.lru import LruList

CHUNK_SHIFT = 6
CHUNK_SIZE = 1 << CHUNK_SHIFT
NCHUNKS = PAGE_SIZE // CHUNK_SIZE


class Zbud:
    name = "zbud"
    walk: Walk | None = None  # gets walk its handles in Python ...
    file: File | None = None  # ... puts file their zpages in Python ...
    free_many: FreeMany | None = None  # ... and the pages they replace are freed there
    compactable = 0  # never: see compact()
    on_compactable: Callable[[], None] | None = None

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.lru = LruList()
        self.unit_shift = 1  # unit id = handle >> unit_shift
        self.frame = array("I", [0])
        self.first = array("B", [0])
        self.last = array("B", [0])
        self._free_ids = array("I")
        self.unbuddied: list[dict[int, None]] = [{} for _ in range(NCHUNKS + 1)]
        self._mask = 0  # bit n set when unbuddied[n] is non-empty
        self.zpages = 0
        self.frames = 0

    # -- unbuddied lists --------------------------------------------------------------------
    def _list_add(self, zid: int, free_chunks: int) -> None:
        self.unbuddied[free_chunks][zid] = None
        self._mask |= 1 << free_chunks

    def _list_del(self, zid: int, free_chunks: int) -> None:
        bucket = self.unbuddied[free_chunks]
        del bucket[zid]
        if not bucket:
            self._mask &= ~(1 << free_chunks)

    def _find_fit(self, chunks: int) -> int:
        """Id of a half-used frame with the fewest free chunks >= `chunks`, taken off its list."""
        fits = self._mask >> chunks
        if not fits:
            return 0
        free_chunks = chunks + (fits & -fits).bit_length() - 1
        bucket = self.unbuddied[free_chunks]
        zid = next(iter(bucket))
        self._list_del(zid, free_chunks)
        return zid

    # -- frames -----------------------------------------------------------------------------
    def _new_id(self, frame: int) -> int:
        if self._free_ids:
            zid = self._free_ids.pop()
            self.frame[zid] = frame
        else:
            zid = len(self.frame)
            self.frame.append(frame)
            self.first.append(0)
            self.last.append(0)
            self.lru.grow(zid + 1)
        self.frames += 1
        return zid

    def _release(self, zid: int) -> None:
        self.lru.remove(zid)
        self.arena.free(self.frame[zid])
        self._free_ids.append(zid)
        self.frames -= 1

    # -- allocator interface ----------------------------------------------------------------
    def alloc(self, zpage: bytes, tick: int) -> int:
        size = len(zpage)
        if not 0 < size <= PAGE_SIZE:
            raise InvalidPage(f"zbud stores zpages of 1 to {PAGE_SIZE} bytes, got {size}")
        chunks = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT
        zid = self._find_fit(chunks)
        if zid:
            self.lru.tick[zid] = tick
        else:
            frame = self.arena.alloc()
            if frame < 0:
                return -1
            zid = self._new_id(frame)
            self.lru.push(zid, tick)
        base = self.frame[zid] << 12
        if self.first[zid] == 0:
            self.first[zid] = chunks
            self.arena.view[base : base + size] = zpage
            handle = zid << 1
        else:
            self.last[zid] = chunks
            start = base + PAGE_SIZE - (chunks << CHUNK_SHIFT)
            self.arena.view[start : start + size] = zpage
            handle = zid << 1 | 1
        free_chunks = NCHUNKS - self.first[zid] - self.last[zid]
        if free_chunks and not (self.first[zid] and self.last[zid]):
            self._list_add(zid, free_chunks)
        self.zpages += 1
        return handle

    def _extent(self, handle: int) -> Extent:
        zid = handle >> 1
        if handle & 1:
            chunks = self.last[zid]
            return self.frame[zid], PAGE_SIZE - (chunks << CHUNK_SHIFT), PAGE_SIZE
        return self.frame[zid], 0, self.first[zid] << CHUNK_SHIFT

    def read(self, handle: int) -> bytes:
        frame, start, end = self._extent(handle)
        base = frame << 12
        return self.arena.map[base + start : base + end]

    def locate(self, handle: int) -> int:
        frame, start, _ = self._extent(handle)
        return frame << 12 | start

    def free(self, handle: int) -> None:
        zid = handle >> 1
        first, last = self.first[zid], self.last[zid]
        if first and last:  # buddied: becomes unbuddied
            if handle & 1:
                self.last[zid] = 0
                self._list_add(zid, NCHUNKS - first)
            else:
                self.first[zid] = 0
                self._list_add(zid, NCHUNKS - last)
        else:
            used = first or last
            if used < NCHUNKS:
                self._list_del(zid, NCHUNKS - used)
            self.first[zid] = self.last[zid] = 0
            self._release(zid)
        self.zpages -= 1

    def unit_handles(self, unit: int) -> list[int]:
        handles = []
        if self.first[unit]:
            handles.append(unit << 1)
        if self.last[unit]:
            handles.append(unit << 1 | 1)
        return handles

    def unit_frames(self, unit: int) -> int:
        return 1

    def compact(self, on_move: MoveCallback, enough: Callable[[], bool] | None = None) -> int:
        """zbud frames hold at most two zpages and are freed as soon as both go: nothing to do."""
        return 0

    def extents(self) -> Iterator[tuple[int, list[Extent]]]:
        for zid in self.lru:
            for handle in self.unit_handles(zid):
                yield handle, [self._extent(handle)]

    def owned_frames(self) -> set[int]:
        return {self.frame[zid] for zid in self.lru}

    def metadata_bytes(self) -> int:
        lists = sum(len(b) for b in self.unbuddied) * 24
        return array_bytes(self.frame, self.first, self.last, self._free_ids) + (
            self.lru.metadata_bytes() + lists
        )
