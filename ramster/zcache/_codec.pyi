# Types of the native codec (native/codec.rs): a put batch's encoding and a get batch's opening,
# each one call that releases the GIL for the whole batch; zsmalloc's batch paths (Slots) and the
# page index's (index_get, index_update) and raw frames' runs (raw_file, raw_free), which keep
# it.
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from typing_extensions import Buffer

def encode_pages(
    keys: Sequence[tuple[int, int]], pages: Sequence[Buffer], threshold: int, store_raw: bool
) -> list[bytes | None]: ...
def open_zpages_at(
    keys: Sequence[tuple[int, int]], buffer: Buffer, offsets: Sequence[int]
) -> list[bytes | str]: ...
def raw_file(
    raw: Any,
    items: Any,
    first: int,
    tag: int,
    tick: int,
    stored: Any,
    handles: list[int],
    results: list[Any],
    lent: list[int],
    spare: list[int],
) -> tuple[int, int, int]: ...
def raw_free(
    raw: Any,
    handles: list[int],
    first: int,
    tag: int,
    mask: int,
    frames: list[int],
    ids: list[int],
) -> int: ...
def index_get(
    objects: dict[int, dict[int, array[int]]], keys: list[tuple[int, int]]
) -> list[int]: ...
def index_update(
    objects: dict[int, dict[int, array[int]]],
    keys: list[tuple[int, int]],
    handles: list[int] | None,
    empty: array[int],
    displaced_only: bool,
) -> tuple[list[int], int]: ...

class Slots:
    def __init__(
        self,
        slot_bits: int,
        max_frames: int,
        sizes: Sequence[int],
        slots: Sequence[int],
        owned: Sequence[Sequence[int]],
        length_class: Sequence[int],
        groups: int,
        quarter: Sequence[Sequence[int]],
    ) -> None: ...
    def walk(
        self,
        zs: object,
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
    def file(
        self,
        zs: object,
        items: list[bytes | None] | Zpages,
        first: int,
        tag: int,
        tick: int,
        stored: object,
        handles: list[int],
        results: list[Any],
        lent: list[int],
        spare: list[int],
        born: list[int],
        skipped: list[int],
    ) -> tuple[int, int, int, int, int]: ...
    def free(
        self,
        zs: object,
        handles: list[int],
        first: int,
        tag: int,
        mask: int,
        skip: int,
        skipped: list[int],
    ) -> tuple[int, int]: ...

class Zpages:
    """A codec worker's encodings of a put batch (native/zpages.rs): bytes or None per page."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> bytes | None: ...
    def __iter__(self) -> Iterator[bytes | None]: ...  # by __getitem__, to the IndexError

class CodecPool:
    def __init__(self, threads: int, name: str, nice: int = 0) -> None: ...
    def fileno(self) -> int: ...
    def encode(
        self,
        keys: Sequence[tuple[int, int]],
        pages: Sequence[Buffer],
        threshold: int,
        store_raw: bool,
    ) -> int: ...
    def open(
        self, keys: Sequence[tuple[int, int]], buffer: Buffer, offsets: Sequence[int]
    ) -> int: ...
    def finished(
        self,
    ) -> list[tuple[int, Zpages | list[bytes | str] | RuntimeError]]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...
