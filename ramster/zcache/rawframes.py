# Raw frames: one incompressible page per frame, for the store-raw policy.
#
# A raw zpage is the 18-byte header plus 4096 bytes of page, which fits neither a zbud half nor a
# zsmalloc class.  Rather than a two-frame class that wastes half of it, the page fills one frame
# and its header lives beside it in a list; raw pages are the exception (incompressible data under
# an opt-in policy), so a Python object per page is affordable here and nowhere else.  alloc()
# takes exactly that shape (RAW_ZPAGE bytes) and refuses any other with InvalidPage before it
# takes a frame.
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from ramster.zcache.allocator import Extent, File, FreeMany, MoveCallback, Walk, array_bytes
from ramster.zcache.arena import Arena
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE
from ramster.zcache.errors import InvalidPage
from ramster.zcache.lru import LruList

RAW_ZPAGE = HEADER_SIZE + PAGE_SIZE


class RawFrames:
    name = "raw"
    walk: Walk | None = None  # gets walk its handles in Python ...
    file: File | None = None  # ... puts file their zpages in Python ...
    free_many: FreeMany | None = None  # ... and the pages they replace are freed there
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

    def compact(self, on_move: MoveCallback) -> int:
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
