# The wire conventions of ramster.v1, in one neutral module that the engine, the node and the
# client share: the page size, key ranges, batch layout, the per-page enums, message limits and
# the buffer tuning of processes that move big messages.
#
# Page size and enums: PAGE_SIZE, Outcome and PageStatus are defined here and nowhere else; the
# engine (ramster.zcache) files its put results as Outcome, so the number a put returns is the
# number the wire carries, with no table between them.  The enum values are the proto's numbers
# (tests/node/test_wire.py checks them against ramster/v1), and this module imports no protobuf,
# so the engine that imports it stays free of gRPC.
#
# Batches: a batch moves its pages as one bytes blob (pages back to back) and its keys as packed
# integer lists, so the per-page cost on either end is one slice or one join, not a protobuf
# message.  `oids` holds one object id for every page, or one per page.  Everything that checks
# a batch lives here so the node and the client agree on what is valid, and messages say what
# was wrong.  page_run() checks a blob of pages for the node, which codes them where they lie
# (page_views() cuts one into a view per page): no page is copied until the engine takes it.
#
# Keys: pool ids and page indexes are uint64 on the wire (so a value from a 64-bit caller is
# never silently cut to its low 32 bits, which would name another page or pool).  A client's
# pool id is the node's public one (all 64 bits); the engine and the peer API serve pool ids
# below ENGINE_POOL_LIMIT, and page indexes below INDEX_LIMIT, so the node checks the full value
# and refuses the rest by field name and value (KeyOutOfRange, a ValueError: INVALID_ARGUMENT);
# the client runs the same checks before it sends.  A batch's indexes are checked with one min()
# and one max() (C loops), which costs microseconds against a batch's milliseconds.
#
# Buffers: a 4 MiB batch is copied a few times on its way (transport buffer, Python bytes, page
# slices).  By default glibc serves such sizes with fresh mmap()s, or trims the heap top after
# they are freed, so every batch pays page faults and zeroing of memory it just had: on a loaded
# 2-core machine that was ~25% of a node's CPU.  keep_freed_memory() raises the mmap and trim
# thresholds (and pads heap growth) so freed buffers are reused warm, at the cost of up to
# ~256 MiB of freed memory staying resident until the node trims its heap when traffic pauses
# (node/heap.py); the page arena is an mmap of its own and unaffected.  It also keeps every
# thread in one malloc arena: gRPC's threads otherwise get arenas of their own, where a
# stream of 1 MiB messages left ~12 MiB resident that no trim gave back (measured on an owner
# after 150,000 evictions: 154 -> 78 bytes per remote page); one arena costs a lock shared
# with those threads, which mostly wait in epoll.  On a libc without mallopt (musl, macOS) it
# does nothing.
from __future__ import annotations

import ctypes
import ctypes.util
import enum
from collections.abc import Sequence

PAGE_SIZE = 4096
POOL_LIMIT = 1 << 64  # pool ids clients use: uint64 (a node's salt above its engine id)
ENGINE_POOL_LIMIT = 1 << 32  # pool ids of the engine and the peer API (backing file: 32 bits)
INDEX_LIMIT = 1 << 32  # page indexes: [0, INDEX_LIMIT)
OID_LIMIT = 1 << 64  # object ids: the whole uint64
MAX_BATCH_PAGES = 4096
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
assert MAX_BATCH_PAGES * PAGE_SIZE < MAX_MESSAGE_BYTES  # a full batch fits in one message
Blob = bytes | bytearray | memoryview  # pages as they arrive: a message's bytes, or a view of them


class Outcome(enum.IntEnum):
    """What became of one put page (values are the wire's PutOutcome numbers)."""

    STORED = 1
    SAME_FILLED = 2
    STORED_RAW = 3
    REFUSED_POOR_COMPRESSION = 4
    REFUSED_NO_ROOM = 5

    @property
    def refused(self) -> bool:
        return self >= Outcome.REFUSED_POOR_COMPRESSION

    @property
    def reason(self) -> str:
        """'stored', 'same_filled', 'stored_raw', 'poor_compression' or 'no_room'."""
        return self.name.lower().removeprefix("refused_")


class PageStatus(enum.IntEnum):
    """What a get found for one key (values are the wire's PageStatus numbers)."""

    HIT = 1
    MISS = 2
    CORRUPT = 3  # every copy failed verification: the data is lost
    UNAVAILABLE = 4  # the page exists but no copy of it can be reached now
    LOST = 5  # no page, in a pool that may have lost pages in a crash (AcceptLoss clears it)


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


def page_run(blob: Blob, count: int) -> memoryview:
    """A blob of `count` pages back to back, as a byte view of it (the engine codes the pages
    where they lie)."""
    view = memoryview(blob).cast("B")
    if view.nbytes != count * PAGE_SIZE:
        raise BatchError(
            f"{count} keys need {count * PAGE_SIZE} bytes of pages, got {view.nbytes} bytes "
            f"(pages are exactly {PAGE_SIZE} bytes)"
        )
    return view


def page_views(blob: Blob, count: int) -> list[memoryview]:
    """`count` pages out of a blob of pages back to back, as views of it (nothing is copied:
    the engine copies each page when it takes it)."""
    view = page_run(blob, count)
    ends = range(PAGE_SIZE, view.nbytes + PAGE_SIZE, PAGE_SIZE)  # slices made at C speed
    return list(map(view.__getitem__, map(slice, range(0, view.nbytes, PAGE_SIZE), ends)))


def byte_size(blob: Blob) -> int:
    """How many bytes `blob` holds (a view's, whatever its item format)."""
    return len(blob) if type(blob) is bytes else memoryview(blob).nbytes


def check_pages(pages: Sequence[Blob]) -> None:
    """BatchError unless every page is exactly one page long."""
    for n, page in enumerate(pages):
        size = byte_size(page)
        if size != PAGE_SIZE:
            raise BatchError(f"page {n} of the batch is {size} bytes, not {PAGE_SIZE}")


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_MALLOC_TUNING = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_THRESHOLD, 64 << 20),
    (_M_TRIM_THRESHOLD, 256 << 20),
    (_M_TOP_PAD, 64 << 20),
)


def keep_freed_memory() -> bool:
    """Keep big freed buffers in the process (glibc mallopt); whether this libc took it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_TUNING)
