# Same-filled pages: a page that is one 8-byte word repeated is stored as the word alone.
#
# Words are interned with reference counts, so the many zero pages of a workload share one entry
# and the index holds a small slot number instead of a frame handle.  No frame is ever used.
from __future__ import annotations

from array import array


class SameFilledWords:
    def __init__(self) -> None:
        self._slot: dict[bytes, int] = {}
        self.words: list[bytes] = []
        self._refs = array("Q")
        self._free = array("I")
        self.pages = 0

    def ref(self, word: bytes) -> int:
        slot = self._slot.get(word)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self.words[slot] = word
            else:
                slot = len(self.words)
                self.words.append(word)
                self._refs.append(0)
            self._slot[word] = slot
        self._refs[slot] += 1
        self.pages += 1
        return slot

    def unref(self, slot: int) -> None:
        self._refs[slot] -= 1
        self.pages -= 1
        if not self._refs[slot]:
            del self._slot[self.words[slot]]
            self.words[slot] = b""
            self._free.append(slot)

    def page(self, slot: int) -> bytes:
        return self.words[slot] * 512

    def metadata_bytes(self) -> int:
        return 100 * len(self._slot) + 8 * len(self.words) + 8 * len(self._refs)
