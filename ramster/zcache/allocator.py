# The contract between the zcache core and its zpage allocators (zbud, zsmalloc, raw frames).
#
# An allocator owns frames taken from the shared Arena and numbers its reclaimable *units* (a zbud
# page, a zspage, a raw frame) with dense ids threaded through an LruList.  Handles are positive
# integers below 2**56 that only the issuing allocator interprets.  The core never looks inside a
# frame: it asks for a zpage's bytes by handle and, for reclaim and compaction, for the handles
# living in one unit; the zpage header then names the owner key ("bottom-up" reclaim).
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ramster.zcache.halves import Encodings
from ramster.zcache.lru import LruList

# Extent of a live zpage in the arena: (frame, start offset in frame, end offset in frame).
Extent = tuple[int, int, int]
# Called by compaction for each zpage it moves: (old handle, new handle, zpage bytes).
MoveCallback = Callable[[int, int, bytes | memoryview], None]


class Walk(Protocol):
    """A native walk over a get batch's handles (Zsmalloc.walk)."""

    def __call__(
        self,
        handles: list[int],
        first: int,
        tag: int,
        mask: int,
        tick: int,
        copy: bool,
        at: list[int],
        zpages: bytearray,
        starts: list[int],
        in_place: list[int],
        offsets: list[int],
    ) -> tuple[int, int, int]: ...


class File(Protocol):
    """A native filing of a put batch's zpages (Zsmalloc.file)."""

    def __call__(
        self,
        items: Encodings,
        first: int,
        tag: int,
        tick: int,
        stored: Any,
        handles: list[int],
        results: list[Any],
        skipped: list[int],
    ) -> tuple[int, int]: ...


class FreeMany(Protocol):
    """Native frees of a run of a batch's handles (Zsmalloc.free_many)."""

    def __call__(
        self, handles: list[int], first: int, tag: int, mask: int, skip: int, skipped: list[int]
    ) -> int: ...


class Allocator(Protocol):
    name: str
    lru: LruList  # a use of handle h is recorded as lru.tick[h >> unit_shift] = tick
    unit_shift: int
    zpages: int  # live zpages held in frames
    frames: int  # frames owned
    compactable: int  # non-zero when compact() would free frames
    on_compactable: Callable[[], None] | None  # called when `compactable` leaves zero

    @property
    def walk(self) -> Walk | None:
        """The common case of a get batch's walk in one call, where the allocator has one
        (ZCache._read)."""
        ...

    @property
    def file(self) -> File | None:
        """The common case of a put batch's filing in one call, where the allocator has one
        (ZCache._file_encoded)."""
        ...

    @property
    def free_many(self) -> FreeMany | None:
        """The frees of many handles in few calls, where the allocator has them (ZCache's
        release of the pages a put batch replaces)."""
        ...

    def alloc(self, zpage: bytes, tick: int) -> int:
        """Store `zpage`; its handle, or -1 when no frame can be had."""
        ...

    def read(self, handle: int) -> bytes:
        """A copy of the slot's bytes: the zpage, possibly followed by padding (one slice of
        the arena's mmap: cheaper than a memoryview, which would need a copy anyway)."""
        ...

    def locate(self, handle: int) -> int:
        """Where the slot starts in the arena (a byte offset) if the zpage lies in one frame,
        else -1 (read() joins its parts): a get opens such a zpage in place, with no copy."""
        ...

    def free(self, handle: int) -> None: ...

    def unit_handles(self, unit: int) -> list[int]:
        """Handles of every live zpage in `unit` (freeing them all frees the unit's frames)."""
        ...

    def unit_frames(self, unit: int) -> int: ...

    def compact(self, on_move: MoveCallback, enough: Callable[[], bool] | None = None) -> int:
        """Move zpages to free whole units, stopping early once `enough()` says so (checked
        between steps that each leave the allocator consistent); the frames given back."""
        ...

    def extents(self) -> Iterator[tuple[int, list[Extent]]]:
        """(handle, extents) of every live zpage, for invariant checks."""
        ...

    def owned_frames(self) -> set[int]: ...

    def metadata_bytes(self) -> int: ...


def array_bytes(*arrays: object) -> int:
    """Buffer bytes of array.array objects (used for metadata accounting)."""
    total = 0
    for a in arrays:
        info = a.buffer_info()  # type: ignore[attr-defined]
        total += info[1] * a.itemsize  # type: ignore[attr-defined]
    return total
