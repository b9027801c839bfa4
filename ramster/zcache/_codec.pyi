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
