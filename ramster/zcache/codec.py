# Page codec: same-filled detection, LZ4 block compression and the zpage wire format.
#
# A zpage is what every allocator, the backing file and (later) peers hold:
#
#     +--------+--------+--------+--------+-------------------+
#     |  sum   | length | index  |  oid   | payload (length)  |
#     |  u32   |  u16   |  u32   |  u64   |                   |
#     +--------+--------+--------+--------+-------------------+
#
# The 18-byte header makes a zpage self-describing: reclaim finds a zpage's owner key from the
# bytes in its frame without searching the index (zcache2's "bottom-up" handle), and a zpage can
# be written to disk or sent to a peer as-is, compressed exactly once.  The checksum is the low 32
# bits of XXH3-64 over the payload, seeded with the key, so a flipped bit in the key, the length or
# the payload is caught on get; XXH3 costs a fifth of zlib's crc32, which matters on a path whose
# budget is a small multiple of one LZ4 decompression.  `length == PAGE_SIZE` marks a page stored
# raw (incompressible, under the store-raw policy).
#
# The batch paths (halves.py) write and read the same format in native code (native/codec.rs),
# a batch per call without the GIL; tests/zcache/test_native_codec.py holds the two to one format.
#
# Trade-off: the header costs ~1.3% density at a 3x ratio; in exchange the per-page metadata in
# Python memory stays a single 64-bit handle in the index.
from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial

import lz4.block
import xxhash

from ramster.wire import PAGE_SIZE as PAGE_SIZE
from ramster.zcache.errors import CorruptPage

WORD = 8
HEADER = struct.Struct("<IHIQ")
HEADER_SIZE = HEADER.size
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_xxh = xxhash.xxh3_64_intdigest
_SUM_MASK = 0xFFFFFFFF
_decompress = lz4.block.decompress


def same_filled_word(page: bytes) -> bytes | None:
    """The repeated 8-byte word if `page` is one word repeated, else None."""
    word = page[:WORD]
    if page == word * (PAGE_SIZE // WORD):
        return word
    return None


# LZ4 block compression without a size prefix (the size is always PAGE_SIZE); a partial, so a
# put pays one C call, not a Python one around it.
compress: Callable[[bytes | memoryview], bytes] = partial(lz4.block.compress, store_size=False)


def make_zpage(oid: int, index: int, payload: bytes | memoryview) -> bytes:
    """Wrap a compressed (or raw, when len == PAGE_SIZE) payload in a checksummed header."""
    return _pack_header(_xxh(payload, oid ^ index << 32) & _SUM_MASK, len(payload), index, oid) + (
        payload
    )


def zpage_key(zpage: bytes | memoryview) -> tuple[int, int]:
    """(oid, index) recorded in a zpage header."""
    _, _, index, oid = _unpack_header(zpage)
    key: tuple[int, int] = (oid, index)
    return key


def zpage_bytes(slot: bytes | memoryview) -> bytes:
    """A copy of the zpage at the start of `slot`, without the slot's padding (unverified)."""
    return bytes(slot[: HEADER_SIZE + int.from_bytes(slot[4:6], "little")])


def zpage_length(zpage: bytes | memoryview) -> int:
    """Length of the intact zpage at the start of `zpage` (header included), 0 if it is not one."""
    if len(zpage) < HEADER_SIZE:
        return 0
    total, length, index, oid = _unpack_header(zpage)
    length = int(length)
    payload = memoryview(zpage)[HEADER_SIZE : HEADER_SIZE + length]
    if length > PAGE_SIZE or len(payload) != length:
        return 0
    if _xxh(payload, oid ^ index << 32) & _SUM_MASK != total:
        return 0
    return HEADER_SIZE + length


def open_zpage(zpage: bytes | memoryview, oid: int, index: int, at: int = 0) -> bytes:
    """Verify the zpage at offset `at` of `zpage` against its checksum and expected key, and
    return the 4096-byte page."""
    total, length, zindex, zoid = _unpack_header(zpage, at)
    payload = zpage[at + HEADER_SIZE : at + HEADER_SIZE + length]  # of a memoryview: no copy
    if zoid != oid or zindex != index:
        raise CorruptPage(
            f"zpage filed under oid={oid} index={index} names oid={zoid} index={zindex}"
        )
    if len(payload) != length or _xxh(payload, oid ^ index << 32) & _SUM_MASK != total:
        raise CorruptPage(f"zpage for oid={oid} index={index} failed its checksum")
    if length == PAGE_SIZE:
        return bytes(payload)
    try:
        page: bytes = _decompress(payload, PAGE_SIZE)  # uncompressed_size
    except lz4.block.LZ4BlockError as exc:
        raise CorruptPage(f"zpage for oid={oid} index={index} does not decompress") from exc
    if len(page) != PAGE_SIZE:
        raise CorruptPage(f"zpage for oid={oid} index={index} decompresses to {len(page)} bytes")
    return page
