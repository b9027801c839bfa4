# Input checks of the engine's entry points: keys, pages, zpages, pool ids.
#
# Every entry point guards its input before it changes anything (as zbud_alloc refuses an
# oversize object), so a bad key or page refuses a whole batch with nothing changed, and the hot
# paths behind these checks trust what they get.  The checks of a batch test the common case (an
# int in range, bytes of the right length) inline and only fall back to the per-item check, with
# its message, for an item that fails it.  The limits are the tmem key's: a 64-bit object id, a
# 32-bit page index, and a 32-bit pool id (the backing file records pool ids in 32 bits).
from __future__ import annotations

from array import array

from ramster.wire import INDEX_LIMIT
from ramster.zcache.codec import PAGE_SIZE, zpage_key, zpage_length
from ramster.zcache.errors import InvalidConfig, InvalidKey, InvalidPage
from ramster.zcache.rawframes import RAW_ZPAGE

MAX_OID = (1 << 64) - 1
MAX_INDEX = INDEX_LIMIT - 1
MAX_POOL_ID = (1 << 32) - 1


def check_key(oid: object, index: object) -> None:
    if type(oid) is not int or not 0 <= oid <= MAX_OID:
        raise InvalidKey(f"object id must be an integer in [0, 2**64), got {oid!r}")
    if type(index) is not int or not 0 <= index <= MAX_INDEX:
        raise InvalidKey(f"page index must be an integer in [0, 2**32), got {index!r}")


def check_keys(keys: list[tuple[int, int]]) -> None:
    """Every key of a batch is an (object id, page index) pair of ints in range.  The common
    case is checked in C loops (zip, map, set, array: ~80 ns per key); a batch that fails it is
    walked key by key for the message."""
    try:
        if len(keys[0]) == 2 and _all_in_range(*zip(*keys, strict=True)):
            return
    except (IndexError, TypeError, ValueError, OverflowError):  # empty, not pairs, out of range
        pass
    try:
        for oid, index in keys:
            if not (type(oid) is int and 0 <= oid <= MAX_OID) or not (
                type(index) is int and 0 <= index <= MAX_INDEX
            ):
                check_key(oid, index)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidKey):
            raise
        raise InvalidKey(f"a key must be an (object id, page index) pair: {exc}") from None


def _all_in_range(oids: tuple[int, ...], indexes: tuple[int, ...]) -> bool:
    """Whether every object id and page index is an int (not a bool); OverflowError if one is
    out of range (packing them in unsigned arrays of the key's widths checks that in C)."""
    if set(map(type, oids)) == _INT == set(map(type, indexes)):
        array(_U64, oids)
        array(_U32, indexes)
        return True
    return False


_INT = {int}
# Unsigned array types exactly as wide as an object id and a page index.
_U64 = next(t for t in "BHILQ" if array(t).itemsize == 8)
_U32 = next(t for t in "BHILQ" if array(t).itemsize == 4)
assert MAX_OID == (1 << 64) - 1 and MAX_INDEX == (1 << 32) - 1


def as_page(page: object) -> bytes:
    """`page` as bytes, if it is a bytes-like object of exactly PAGE_SIZE bytes."""
    if type(page) is not bytes:
        try:
            page = bytes(memoryview(page))  # type: ignore[arg-type]
        except TypeError:
            raise InvalidPage(
                f"a page must be a bytes-like object, got {type(page).__name__}"
            ) from None
    if len(page) != PAGE_SIZE:
        raise InvalidPage(f"a page must be exactly {PAGE_SIZE} bytes, got {len(page)}")
    return page


def check_put_batch(keys: list[tuple[int, int]], pages: list[bytes]) -> list[bytes]:
    """The pages of a put batch as bytes, once every key and page has been checked."""
    if len(keys) != len(pages):
        raise InvalidPage(f"{len(keys)} keys but {len(pages)} pages")
    check_keys(keys)
    return [p if type(p) is bytes and len(p) == PAGE_SIZE else as_page(p) for p in pages]


def check_zpages(zpages: list[bytes]) -> list[tuple[int, int]]:
    """The keys that a batch of stored zpages (a peer's) name in their headers, once each zpage
    has been checked to be intact and to fit a frame (raw pages have frames of their own)."""
    keys = []
    for zpage in zpages:
        if type(zpage) is not bytes or not 0 < zpage_length(zpage) == len(zpage):
            raise InvalidPage("a zpage must be one intact zpage (header, payload, checksum)")
        if PAGE_SIZE < len(zpage) != RAW_ZPAGE:
            raise InvalidPage(
                f"a zpage of {len(zpage)} bytes fits no frame: at most {PAGE_SIZE} bytes, or "
                f"{RAW_ZPAGE} for a raw page"
            )
        keys.append(zpage_key(zpage))
    return keys


def check_pool_id(pool_id: object) -> int:
    if type(pool_id) is not int or not 0 <= pool_id <= MAX_POOL_ID:
        raise InvalidConfig(f"a pool id must be an integer in [0, 2**32), got {pool_id!r}")
    return pool_id
