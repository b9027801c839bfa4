# The pure halves of the engine's batch paths: encoding a put batch, opening a get batch.
#
# A put batch is encoded here (LZ4, same-filled check, zpage framing) and then filed by
# ZCache.file_encoded; a get batch is read out by ZCache.read_sealed (index, LRU, copies of the
# zpages) and then opened here (verify, decompress).  These halves read nothing but their own
# inputs and a copy of a pool's policy, so they may run in worker threads while the engine keeps
# serving on its own thread: each is one call of the native codec (native/codec.rs), which
# releases the GIL for the whole batch, so a worker codes pages while the loop runs Python.
# ZCache.put_batch and get_batch run the two halves back to back.  The price is a copy of each
# zpage a get reads (the frame may be reused before the copy is opened), back to back in one
# bytearray (a bytes object per zpage cost its malloc, copy and free: 12% of the event loop's
# time on NBD sequential reads), and one more list per batch.
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ramster.zcache._codec import Zpages, encode_pages, open_zpages_at
from ramster.zcache.errors import CorruptPage, PageError

# A put batch's encodings, for ZCache.file_encoded: encode()'s list, or a codec worker's Zpages
# (the same sequence of bytes or None, read in place: native/zpages.rs).
Encodings = list[bytes | None] | Zpages


@dataclass(frozen=True, slots=True)
class PageEncoder:
    """The part of a put that needs no engine state: same-filled check, LZ4, zpage framing.
    It reads nothing but its arguments and this copy of a pool's policy, so encode() may run
    on any thread (without the GIL) while the engine serves other calls."""

    threshold: int  # largest payload stored compressed
    store_raw: bool  # a page that compresses worse is stored raw (else refused)

    def encode(
        self, keys: Sequence[tuple[int, int]], pages: Sequence[bytes | memoryview]
    ) -> list[bytes | None]:
        """Per checked page (bytes, or a view that nothing writes meanwhile: it is read in
        place, not copied; a buffer may hold a run of whole pages back to back, as many pages in
        all as keys): its word if it is same-filled (WORD bytes), its zpage (compressed, or raw
        under store_raw), or None (refused for poor compression)."""
        return encode_pages(keys, pages, self.threshold, self.store_raw)


@dataclass(slots=True)
class SealedPages:
    """A get batch read out of the engine (ZCache.read_sealed): `pages` holds each key's answer
    except at the positions `at`, whose zpage copies (in `zpages`, each from its offset in
    `starts`) wait for open() to verify and decompress them.  open() touches nothing but this
    object, so it may run on any thread."""

    keys: list[tuple[int, int]]
    pages: list[bytes | PageError | None]
    at: list[int] = field(default_factory=list)
    zpages: bytearray = field(default_factory=bytearray)
    starts: list[int] = field(default_factory=list)
    opened: int = 0
    corrupt: int = 0

    def open(self) -> SealedPages:
        return self.place(open_zpages_at(self.waiting_keys(), self.zpages, self.starts))

    def wait(self, i: int, zpage: bytes) -> None:
        """Keep a copy of the zpage of position `i` for open() (the native walk keeps its own)."""
        self.at.append(i)
        self.starts.append(len(self.zpages))
        self.zpages += zpage

    def waiting_keys(self) -> list[tuple[int, int]]:
        """The keys of the zpages that wait to be opened, in their order."""
        return [self.keys[i] for i in self.at]

    def place(self, opened: list[bytes | str]) -> SealedPages:
        """The waiting zpages as opened (by open_zpages_at, here or elsewhere) into pages."""
        self.corrupt += place_opened(self.pages, self.at, opened)
        self.opened += len(self.at)
        self.at, self.zpages, self.starts = [], bytearray(), []
        return self


def place_opened(
    pages: list[bytes | PageError | None], at: list[int], opened: list[bytes | str]
) -> int:
    """Each page the native codec opened into `pages` at its position in `at`, a CorruptPage
    where it said why not; the number of those."""
    corrupt = 0
    for i, page in zip(at, opened, strict=True):
        if isinstance(page, str):
            pages[i] = CorruptPage(page)
            corrupt += 1
        else:
            pages[i] = page
    return corrupt
