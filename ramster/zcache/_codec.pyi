# Types of the native codec (native/codec.rs): a put batch's encoding and a get batch's opening,
# each one call that releases the GIL for the whole batch.
from collections.abc import Sequence

from typing_extensions import Buffer

def encode_pages(
    keys: Sequence[tuple[int, int]], pages: Sequence[Buffer], threshold: int, store_raw: bool
) -> list[bytes | None]: ...
def open_zpages(keys: Sequence[tuple[int, int]], zpages: Sequence[Buffer]) -> list[bytes | str]: ...
def open_zpages_at(
    keys: Sequence[tuple[int, int]], buffer: Buffer, offsets: Sequence[int]
) -> list[bytes | str]: ...

class SlotWalk:
    def __init__(self, slot_bits: int, max_frames: int, sizes: Sequence[int]) -> None: ...
    def walk(
        self,
        handles: list[int],
        first: int,
        tag: int,
        mask: int,
        tick: int,
        ticks: Buffer,
        cls: Buffer,
        frame: Buffer,
        arena: Buffer,
        copy: bool,
        at: list[int],
        zpages: list[bytes],
        in_place: list[int],
        offsets: list[int],
    ) -> tuple[int, int, int]: ...
