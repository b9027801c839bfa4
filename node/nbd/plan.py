# How an export's blocks map onto the engine, and how a connection's queued requests become
# engine calls (groups), so that a queue of 4 KiB requests costs one engine call, not one each.
#
# Block b (4096 bytes) of an export is key (b >> 20, b & 0xFFFFF) of its pool: one object per
# 4 GiB, so the index's dense per-object arrays fit a disk's mostly sequential use.
#
# groups() cuts the requests a connection has received, in order, into runs that one engine
# batch can serve.  A READ group is consecutive READs (a get batch may repeat a key).  A WRITE
# group is consecutive block-aligned WRITEs, block-aligned WRITE_ZEROES and TRIMs (zeroes and
# trims forget their whole blocks: a forgotten block reads as zeros; a TRIM's partial edges are
# left alone, as TRIM is advisory) touching no block twice: a put batch with a key twice would
# file one of its pages blind, and disjoint blocks make the order inside the group irrelevant.
# FLUSH joins whatever group is open (else it opens a WRITE group): there is nothing to wait
# for, as every acknowledged write is already in the engine.  A WRITE group holds at most
# GROUP_PAGES blocks, a READ group READ_GROUP_PAGES; a request bigger than that is a group of
# its own (the engine batch is chunked anyway, and a big TRIM walks the pool's index), and an
# unaligned WRITE (read-modify-write) or WRITE_ZEROES, or a zero-length one, runs ALONE.  Groups
# run one after the other, so a connection's requests take effect in the order sent, which NBD
# does not even require.
#
# Trade-off: nbdcopy, qemu and the kernel interleave data writes with WRITE_ZEROES for the zero
# blocks they find; letting both into one group is what keeps a sequential copy at ~1 MiB per
# engine call and per reply write instead of ~80 KiB.
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat

from ramster.nbd import Flush, Read, Request, Trim, Write, WriteZeroes
from ramster.zcache import PAGE_SIZE

OID_BITS = 20
INDEX_MASK = (1 << OID_BITS) - 1
# Blocks of one WRITE group (4 MiB) and of one READ group (1 MiB).  A group costs the loop a
# fixed part (its plan, its hops to the codec workers, its map upkeep, a sendmsg of its replies):
# on nbdcopy's writes of the python-app corpus (256 KiB WRITEs; a 1 GiB write and 3 rewrites a
# run, 9-11 alternating runs each) the loop took 6.4 CPU-s per run with 4 MiB groups and 256-page
# hops, against 7.6 with 1 MiB groups and 128-page hops, and moved 486 MiB/s against 442 (gcc:
# 360 against 340); 2 MiB groups gave 7.0.  Reads keep 1 MiB: a read group's replies go out
# when it is done.
GROUP_PAGES = 1024
READ_GROUP_PAGES = 256
Key = tuple[int, int]


def block_keys(first: int, stop: int) -> list[Key]:
    """Engine keys of blocks first..stop-1."""
    oid, index = first >> OID_BITS, first & INDEX_MASK
    if (stop - 1) >> OID_BITS == oid:  # all in one object, as nearly always: made at C speed
        return list(zip(repeat(oid, stop - first), range(index, index + stop - first), strict=True))
    return [(b >> OID_BITS, b & INDEX_MASK) for b in range(first, stop)]


def span(offset: int, length: int) -> tuple[int, int]:
    """The blocks a byte range touches: first, stop."""
    return offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)


def inner(offset: int, length: int) -> tuple[int, int]:
    """The whole blocks inside a byte range: first, stop (stop <= first when there is none)."""
    return -(-offset // PAGE_SIZE), (offset + length) // PAGE_SIZE


class Kind(enum.Enum):
    READ = enum.auto()
    WRITE = enum.auto()
    ALONE = enum.auto()


# Module names for the per-request paths: on Python 3.11 `Kind.WRITE` goes through
# EnumType.__getattr__'s hook (~175 ns, ten times a global's).
READ, WRITE, ALONE = Kind.READ, Kind.WRITE, Kind.ALONE


@dataclass
class Group:
    kind: Kind
    requests: list[Request] = field(default_factory=list)


def blocks_of(request: Request) -> tuple[Kind, int, int]:
    """The group kind a request can join and the blocks it touches there (ALONE: none)."""
    this, offset, length = type(request), request.offset, request.length
    if this is Read:
        first, stop = span(offset, length)
        return READ, first, stop
    if this is Trim:
        first, stop = inner(offset, length)
        return WRITE, first, max(first, stop)
    if (this is Write or this is WriteZeroes) and length and not (offset | length) % PAGE_SIZE:
        return WRITE, offset // PAGE_SIZE, (offset + length) // PAGE_SIZE
    return ALONE, 0, 0


def groups(requests: list[Request]) -> Iterator[Group]:
    """The requests in order, cut into groups (see the header)."""
    group: Group | None = None  # the open group, which may grow
    pages = 0
    # The blocks of the open WRITE group: all below `end`; the ranges of its requests, put in a
    # set only when a request starts below `end` (never in a sequential copy), to check it.
    end, spans, touched = 0, list[range](), set[int]()
    for request in requests:
        if type(request) is Flush:
            if group is None:
                group, pages, end, spans, touched = Group(WRITE), 0, 0, [], set()
            group.requests.append(request)
            continue
        kind, first, stop = blocks_of(request)
        limit = READ_GROUP_PAGES if kind is READ else GROUP_PAGES
        if kind is ALONE or stop - first > limit:  # a group of its own
            if group is not None:
                yield group
                group = None
            yield Group(kind, [request])
            continue
        fits = group is not None and group.kind is kind and pages + stop - first <= limit
        if fits and kind is WRITE and first < end:
            touched.update(*spans)
            spans.clear()
            fits = touched.isdisjoint(range(first, stop))
        if not fits:
            if group is not None:
                yield group
            group, pages, end, spans, touched = Group(kind), 0, 0, [], set()
        assert group is not None
        group.requests.append(request)
        pages += stop - first
        if kind is WRITE:
            spans.append(range(first, stop))
            end = max(end, stop)
    if group is not None:
        yield group
