# Per-pool page index: (object id, page index) -> 64-bit handle, in arrays rather than objects.
#
# tmem indices within an object are dense in practice (frontswap: swap offsets; cleancache: file
# page offsets), so, like the kernel's per-object radix tree, an object maps chunk numbers to
# fixed arrays of 64 handles; a chunk left all zeros is dropped at once, and so is an object
# left without chunks.  A dense object costs ~9 bytes per page; a lone page in its chunk costs
# ~600 bytes, the price of never allocating a Python object per page.  Handle 0 = absent.
#
# A chunk is exactly 512 bytes, so Python's small-object allocator takes it (its own arenas):
# with a 65th word (a live count) it went to malloc's heap, between the zpages that stream
# through a node, and each chunk then pinned the heap page it sat on after those were freed
# (measured: ~5 MiB kept by an owner after 130,000 evictions).
#
# The batch paths (get_many, pop_many, remove_many, set_many) are native (native/index.rs): one
# call per batch, which keeps the chunk of the previous key while keys stay in it, on the same
# dicts and arrays, and checks a chunk for emptiness once a run of keys that zeroed a slot of it
# leaves it; new chunks are copies of the empty one here.
from __future__ import annotations

from array import array
from collections.abc import Iterator

from ramster.zcache._codec import index_get, index_update

CHUNK_BITS = 6
CHUNK = 1 << CHUNK_BITS
CHUNK_MASK = CHUNK - 1
_EMPTY_CHUNK = array("q", bytes(8 * CHUNK))


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

    def replace(self, oid: int, index: int, handle: int) -> None:
        """Change the handle of a key that holds one (compaction, write-back)."""
        self.objects[oid][index >> CHUNK_BITS][index & CHUNK_MASK] = handle

    def pop(self, oid: int, index: int) -> int:
        """Remove and return the handle of a key, 0 if it held none."""
        return self.pop_many([(oid, index)])[0]

    def get_many(self, keys: list[tuple[int, int]]) -> list[int]:
        """Handles of many keys (0 where absent), in order."""
        return index_get(self.objects, keys)

    def pop_many(self, keys: list[tuple[int, int]]) -> list[int]:
        """Remove many keys; their handles (0 where absent), in order."""
        return self._update(keys, None, displaced_only=False)

    def remove_many(self, keys: list[tuple[int, int]]) -> list[int]:
        """Remove many keys; the handles they held (absent keys give none)."""
        return self._update(keys, None, displaced_only=True)

    def set_many(self, keys: list[tuple[int, int]], handles: list[int]) -> list[int]:
        """File handles under keys, in order; handle 0 (a refused put) removes the key instead.
        Returns the handles displaced, if any (a key repeated within the batch)."""
        return self._update(keys, handles, displaced_only=True)

    def _update(
        self, keys: list[tuple[int, int]], handles: list[int] | None, displaced_only: bool
    ) -> list[int]:
        """index_update() over this index, its count kept: the old handles."""
        olds, delta = index_update(self.objects, keys, handles, _EMPTY_CHUNK, displaced_only)
        self.count += delta
        return olds

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

    def chunks_of(self, oid: int) -> list[int]:
        """The numbers of the chunks (CHUNK pages each) where an object holds pages."""
        obj = self.objects.get(oid)
        return list(obj) if obj is not None else []

    def states(self, oid: int, start: int, stop: int) -> bytes:
        """Per page index start..stop-1 of an object: 0 if it holds no handle, else 1.  Chunk
        by chunk, at C speed: a missing chunk is 64 absent pages, a full one 64 held."""
        obj = self.objects.get(oid)
        if obj is None:
            return bytes(stop - start)
        out = bytearray()
        for cno in range(start >> CHUNK_BITS, ((stop - 1) >> CHUNK_BITS) + 1):
            base = cno << CHUNK_BITS
            lo, hi = max(start, base) - base, min(stop, base + CHUNK) - base
            chunk = obj.get(cno)
            if chunk is None:
                out += bytes(hi - lo)
            else:
                part = chunk[lo:hi]
                out += b"\x01" * (hi - lo) if 0 not in part else bytes(map(bool, part))
        return bytes(out)

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
