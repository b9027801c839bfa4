# Per-pool page index: (object id, page index) -> 64-bit handle, in arrays rather than objects.
#
# tmem indices within an object are dense in practice (frontswap: swap offsets; cleancache: file
# page offsets), so, like the kernel's per-object radix tree, an object maps chunk numbers to
# fixed arrays of 64 handles; the 65th slot counts the chunk's live entries so empty chunks and
# objects are dropped at once.  A dense object costs ~9 bytes per page; a lone page in its chunk
# costs ~600 bytes, the price of never allocating a Python object per page.  Handle 0 = absent.
from __future__ import annotations

from array import array
from collections.abc import Iterator

CHUNK_BITS = 6
CHUNK = 1 << CHUNK_BITS
CHUNK_MASK = CHUNK - 1
_EMPTY_CHUNK = array("q", bytes(8 * (CHUNK + 1)))


class PageIndex:
    def __init__(self) -> None:
        self.objects: dict[int, dict[int, array[int]]] = {}
        self.count = 0

    def get(self, oid: int, index: int) -> int:
        obj = self.objects.get(oid)
        if obj is None:
            return 0
        chunk = obj.get(index >> CHUNK_BITS)
        if chunk is None:
            return 0
        return chunk[index & CHUNK_MASK]

    def set(self, oid: int, index: int, handle: int) -> None:
        """File `handle` under a key that holds no handle."""
        obj = self.objects.get(oid)
        if obj is None:
            obj = self.objects[oid] = {}
        chunk = obj.get(index >> CHUNK_BITS)
        if chunk is None:
            chunk = obj[index >> CHUNK_BITS] = array("q", _EMPTY_CHUNK)
        chunk[index & CHUNK_MASK] = handle
        chunk[CHUNK] += 1
        self.count += 1

    def replace(self, oid: int, index: int, handle: int) -> None:
        """Change the handle of a key that holds one (compaction, write-back)."""
        self.objects[oid][index >> CHUNK_BITS][index & CHUNK_MASK] = handle

    def pop(self, oid: int, index: int) -> int:
        """Remove and return the handle of a key, 0 if it held none."""
        obj = self.objects.get(oid)
        if obj is None:
            return 0
        cno = index >> CHUNK_BITS
        chunk = obj.get(cno)
        if chunk is None:
            return 0
        slot = index & CHUNK_MASK
        handle = chunk[slot]
        if handle:
            chunk[slot] = 0
            self.count -= 1
            chunk[CHUNK] -= 1
            if not chunk[CHUNK]:
                del obj[cno]
                if not obj:
                    del self.objects[oid]
        return handle

    def pop_object(self, oid: int) -> list[tuple[int, int]]:
        """Remove every key of an object; their (index, handle) pairs."""
        obj = self.objects.pop(oid, None)
        if obj is None:
            return []
        found = [
            (cno << CHUNK_BITS | slot, chunk[slot])
            for cno, chunk in obj.items()
            for slot in range(CHUNK)
            if chunk[slot]
        ]
        self.count -= len(found)
        return found

    def items(self) -> Iterator[tuple[int, int, int]]:
        """(oid, index, handle) of every key."""
        for oid, obj in self.objects.items():
            for cno, chunk in obj.items():
                for slot in range(CHUNK):
                    if chunk[slot]:
                        yield oid, cno << CHUNK_BITS | slot, chunk[slot]

    def metadata_bytes(self) -> int:
        total = self.objects.__sizeof__()
        for obj in self.objects.values():
            total += obj.__sizeof__() + sum(c.__sizeof__() for c in obj.values())
        return total
