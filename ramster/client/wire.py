# The wire conventions of ramster.v1 shared by the node and the client: limits, page packing,
# key lists and the per-page enums.
#
# A batch moves its pages as one bytes blob (pages back to back) and its keys as packed integer
# lists, so the per-page cost on either end is one slice or one join, not a protobuf message.
# `oids` holds one object id for every page, or one per page.  Everything that checks a batch
# lives here so the node and the client agree on what is valid, and messages say what was wrong.
#
# Keys: pool ids and page indexes are uint64 on the wire (so a value from a 64-bit caller is
# never silently cut to its low 32 bits, which would name another page) but the engine serves
# only [0, 2**32) of each, so the node checks the full value and refuses the rest by field name
# and value (KeyOutOfRange, a ValueError: INVALID_ARGUMENT); the client runs the same checks
# before it sends.  A batch's indexes are checked with one min() and one max() (C loops), which
# costs microseconds against a batch's milliseconds.
from __future__ import annotations

import enum
from collections.abc import Sequence

from ramster.v1 import tmem_pb2 as pb
from ramster.zcache.codec import PAGE_SIZE as PAGE_SIZE
from ramster.zcache.validate import MAX_INDEX

POOL_LIMIT = 1 << 64  # pool ids clients use: uint64 (a node's salt above its engine id)
ENGINE_POOL_LIMIT = 1 << 32  # pool ids of the engine and the peer API (backing file: 32 bits)
INDEX_LIMIT = MAX_INDEX + 1  # page indexes: [0, INDEX_LIMIT), the engine's range
OID_LIMIT = 1 << 64  # object ids: the whole uint64
MAX_BATCH_PAGES = 4096
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class BatchError(ValueError):
    """A batch is malformed: the message says how."""


class KeyOutOfRange(ValueError):
    """A pool id, object id or page index outside what a node serves: the message names the
    field and the value."""


def _limit_text(limit: int) -> str:
    return f"[0, 2**{limit.bit_length() - 1})"


def in_range(field: str, value: int, limit: int) -> int:
    """`value` if it is in [0, limit), else KeyOutOfRange naming `field`."""
    if not 0 <= value < limit:
        raise KeyOutOfRange(f"{field} {value} is out of range {_limit_text(limit)}")
    return value


def all_in_range(field: str, values: Sequence[int], limit: int) -> None:
    """KeyOutOfRange naming `field` and the first value of `values` outside [0, limit)."""
    if values and not (min(values) >= 0 and max(values) < limit):
        bad = next(v for v in values if not 0 <= v < limit)
        raise KeyOutOfRange(f"{field} holds {bad}, out of range {_limit_text(limit)}")


def check_pool(pool: int) -> int:
    return in_range("pool", pool, POOL_LIMIT)


def check_index(index: int) -> int:
    return in_range("index", index, INDEX_LIMIT)


class Outcome(enum.IntEnum):
    """What became of one put page (values are the wire's PutOutcome numbers)."""

    STORED = pb.PUT_OUTCOME_STORED
    SAME_FILLED = pb.PUT_OUTCOME_SAME_FILLED
    STORED_RAW = pb.PUT_OUTCOME_STORED_RAW
    REFUSED_POOR_COMPRESSION = pb.PUT_OUTCOME_REFUSED_POOR_COMPRESSION
    REFUSED_NO_ROOM = pb.PUT_OUTCOME_REFUSED_NO_ROOM

    @property
    def refused(self) -> bool:
        return self >= Outcome.REFUSED_POOR_COMPRESSION

    @property
    def reason(self) -> str:
        """'stored', 'same_filled', 'stored_raw', 'poor_compression' or 'no_room'."""
        return self.name.lower().removeprefix("refused_")


class PageStatus(enum.IntEnum):
    """What a get found for one key (values are the wire's PageStatus numbers)."""

    HIT = pb.PAGE_STATUS_HIT
    MISS = pb.PAGE_STATUS_MISS
    CORRUPT = pb.PAGE_STATUS_CORRUPT
    UNAVAILABLE = pb.PAGE_STATUS_UNAVAILABLE


def check_count(count: int) -> None:
    if count > MAX_BATCH_PAGES:
        raise BatchError(f"a batch of {count} pages exceeds the limit of {MAX_BATCH_PAGES}")


def expand_oids(oids: Sequence[int], count: int) -> list[int] | int:
    """The batch's object ids: one int shared by every page, or a list of one per page."""
    if len(oids) == 1:
        return oids[0]
    if len(oids) != count:
        raise BatchError(f"a batch needs 1 or {count} object ids (one per page), got {len(oids)}")
    return list(oids)


def batch_keys(oids: Sequence[int], indexes: Sequence[int]) -> list[tuple[int, int]]:
    """(oid, index) keys of a batch, checked for size, shape and range."""
    check_count(len(indexes))
    all_in_range("indexes", indexes, INDEX_LIMIT)
    shared = expand_oids(oids, len(indexes))
    if isinstance(shared, int):
        return [(shared, index) for index in indexes]
    return list(zip(shared, indexes, strict=True))


def split_pages(blob: bytes, count: int) -> list[bytes]:
    """`count` pages out of a blob of pages back to back."""
    if len(blob) != count * PAGE_SIZE:
        raise BatchError(
            f"{count} keys need {count * PAGE_SIZE} bytes of pages, got {len(blob)} bytes "
            f"(pages are exactly {PAGE_SIZE} bytes)"
        )
    return [blob[i : i + PAGE_SIZE] for i in range(0, len(blob), PAGE_SIZE)]


def join_pages(pages: Sequence[bytes]) -> bytes:
    """Pages back to back, each checked to be exactly one page long."""
    for n, page in enumerate(pages):
        if len(page) != PAGE_SIZE:
            raise BatchError(f"page {n} of the batch is {len(page)} bytes, not {PAGE_SIZE}")
    return b"".join(pages)
