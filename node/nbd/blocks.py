# An export's blocks in the node's engine: what READ, WRITE, WRITE_ZEROES, TRIM and FLUSH do,
# a group of plan.groups() at a time, with no gRPC hop.
#
# An export NAME is the persistent pool owned by "nbd:NAME" (node/pools.py finds it again after
# a restart), created to store incompressible pages raw: a block device must not refuse a page
# for compressing badly.  Its pages leave RAM to peers and disk like any persistent page.  The
# engine keeps no page of zero bytes in it (ZCache.drop_zero_pages): a block written as zeros
# empties its key, as WRITE_ZEROES does, since a missing block reads as zeros.  (It was kept as
# a same-filled word, which a graceful stop wrote to the backing file as a 512-byte record: after
# the restart the block was data on disk, in the map, in a shrink's check and in every read.)
#
# A READ group is one get batch: a never-written block reads as zeros (ramster.nbd's HOLE_BLOCK,
# which a structured reply sends as a hole), a corrupt page fails its read with EIO, and so does a
# block the export's map (node/nbd/blockmap.py) marks LOST: one that held data and whose page was
# gone at the start (a crash), which must not read as zeros.  Every write, zeroing and trim brings
# the map of its blocks in step with the index before its reply (a WRITE group reads the map and
# the index over its span once, and writes the map only where they differ).  A page out
# of reach (every copy on peers that are frozen, cut off or restarting) is asked for again every
# READ_RETRY seconds, for up to --nbd-read-wait (ReadWait), before its read fails with EIO: a
# kernel that swaps to the export kills the process whose page fails to come in, where a wait
# of a few seconds for a peer's pause costs a stall.  (It failed at once: freezing both peers
# of a chaos run for 2 s failed reads of the export.)  An unaligned write's read of its edges
# waits the same way.  The wait holds the connection's later requests (groups run in order) and
# ends early at a stop; a page gone for good costs each read the whole wait, which is why it is
# bounded.  (The kernel's nbd driver fails a request only if nbd-client set a timeout, -t;
# without one it waits, warning every 30 s.)
#
# A WRITE group is one put batch of its writes' blocks (their payloads, views of the connection's
# input, coded where they lie: the engine copies each page as it takes it) plus the flush of its
# zeroed and trimmed blocks; a write is acknowledged only if every page of it was stored, else it
# fails with ENOSPC (the pages it replaced are gone then, as a failed write leaves its range
# unspecified).  Zeroed and trimmed blocks are flushed, short ranges by their keys, the whole
# group's in one engine call (flush_pages): nbdcopy sends a WRITE_ZEROES for each run of zero pages
# it finds, ~8,500 per GiB of the gcc corpus, mostly of 1-2 blocks.  A range longer than FLUSH_KEYS
# blocks is walked in the pool's index instead, FLUSH_KEYS blocks at a time (objects the pool lacks
# are skipped), its keys flushed in the engine's steps with a yield between
# (ChunkedEngine.flush_keys, as a FlushObject is): a whole-device TRIM (mkfs, blkdiscard) of a big
# export costs the loop what is stored, in steps of well under a millisecond.  (It built every key
# of the range first: a TRIM of 2 GiB stored stalled the loop 362 ms and grew the RSS 87 MB, and a
# node holding 64 GiB would have stalled for seconds, past its peers' timeouts.)  ALONE requests: an
# unaligned WRITE reads its partial first and last blocks first (read-modify-write, under a
# per-export lock so two connections' partial writes to one block cannot lose each other); an
# unaligned WRITE_ZEROES flushes its whole blocks and zeroes the partial edges the same way.  FLUSH
# and FUA have nothing to wait for: every acknowledged write is already in the engine, which all
# connections share (hence CAN_MULTI_CONN); an export is exactly as durable as the node's persistent
# pool.
#
# A connection plans its next groups before their turn (node/nbd/connection.py): plan() works
# out a WRITE group's put batch and, with `start`, has the codec workers encode it at once
# (node/engine.py's encode_ahead, for groups of up to GROUP_PAGES blocks); run() files it when
# its turn comes.  The engine batches run through the server's ChunkedEngine, on the loop or
# with the engine's codec workers (node/nbd/server.py); an engine error, a failed codec worker
# included, fails every request of the group with EIO (a write's pages may then be partly
# stored: NBD leaves a failed write's range unspecified) and the connection goes on.
#
# BLOCK_STATUS (base:allocation) reads the pool's index, no page: a block that holds nothing is a
# hole that reads as zeros (never written, trimmed, zeroed or written as zeros), and any other
# page is data, wherever it lives (RAM, a peer, disk); a lost block is data too (a copy tool
# reads it and fails, rather than writing zeros for it).  It looks at STATUS_BLOCKS blocks of one
# index object and returns STATUS_EXTENTS descriptors at most (the spec lets a reply cover less
# than asked; clients ask again from where it ended), so one request costs the loop little: the
# index is read a chunk of 64 blocks at a time.  As it awaits nothing else, it yields to the loop
# first: a client's queue of 2,000 of them otherwise ran to its end before any other
# connection's request.  A rewrite of a block reported as data may
# still fail with ENOSPC once RAM, peers and disk are all full (its new page may compress
# worse), which the spec's base:allocation rules out; a compressing store cannot promise it.
#
# Answers are (request, error, pieces of a read's data) for the connection to encode: a read's
# pages are not joined here, the connection appends them to its output buffer once.
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import cast

from prometheus_client import Counter

from node.engine import Ahead, ChunkedEngine
from node.logs import LogThrottle, log_event
from node.nbd.blockmap import HOLE, LOST, BlockMap
from node.nbd.plan import (
    GROUP_PAGES,
    INDEX_MASK,
    OID_BITS,
    READ,
    WRITE,
    Group,
    Key,
    block_keys,
    inner,
    span,
)
from ramster.nbd import (
    HOLE_BLOCK,
    BlockStatus,
    CommandFlag,
    Error,
    Export,
    Read,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from ramster.nbd.wire import EXTENT, STATE_HOLE, STATE_ZERO
from ramster.zcache import (
    ABSENT,
    PAGE_SIZE,
    STORED,
    PageError,
    PageUnavailable,
    PutResult,
    ZCache,
    ZCacheError,
)

REFUSED = frozenset(r for r in PutResult if r.refused)  # checked per write at C speed
FLUSH_KEYS = (
    1024  # blocks of a range flushed by their keys; a longer one is walked this many at a time
)
READ_RETRY = 0.25  # seconds between two gets of pages out of reach
LOG_SECONDS = 1.0  # nbd_read_lost and nbd_map_not_written go out at most this often per export
SPAN_BLOCKS = 2 * GROUP_PAGES  # the most blocks of map and index a WRITE group reads at once
STATUS_BLOCKS = 1 << 14  # blocks one BLOCK_STATUS looks at (64 MiB)
STATUS_EXTENTS = 1024  # descriptors one BLOCK_STATUS returns at most
STATUS_FLAGS = {ABSENT: STATE_HOLE | STATE_ZERO, STORED: 0}
# a map's bytes to page_states() ones: LOST blocks STORED, the rest ABSENT (ORed into the index's)
LOST_AS_STORED = bytes(STORED if b == LOST else ABSENT for b in range(256))
RUNS = re.compile(rb"(.)\1*", re.DOTALL)  # runs of one page state
HELD = re.compile(b"[^%c]+" % ABSENT)  # runs of blocks that hold a page
Piece = bytes | memoryview
Answer = tuple[Request, Error, Sequence[Piece]]
GetResult = bytes | PageError | None
NO_DATA: tuple[Piece, ...] = ()
OK, EIO, ENOSPC = Error.OK, Error.EIO, Error.ENOSPC  # module names: see plan.READ's comment


@dataclass
class WritePlan:
    """A WRITE group's put batch (keys, the payloads that hold its pages), the blocks it zeroes
    or trims, and the hops of its encoding already started (node/engine.py's Ahead)."""

    keys: list[Key]
    runs: list[Piece]
    forget: list[tuple[int, int]]
    ahead: Ahead | None

    def drop(self) -> None:
        """Give up the plan unrun: its encoding's results are dropped."""
        if self.ahead is not None:
            self.ahead.drop()


@dataclass(frozen=True)
class Span:
    """What the map (`mapped`) and the index (`held`) said of blocks from `first` on, read in
    one loop step."""

    first: int
    mapped: bytes
    held: bytes

    def cut(self, first: int, stop: int) -> tuple[bytes, bytes]:
        """Both, of blocks first..stop-1 (within the span)."""
        lo, hi = first - self.first, stop - self.first
        return self.mapped[lo:hi], self.held[lo:hi]


@dataclass
class ReadWait:
    """How long a read waits for pages out of reach (0: not at all), what ends the wait early
    (the server stops), and the counter of waits by export and outcome."""

    seconds: float
    stopping: Callable[[], bool]
    counter: Counter


@dataclass
class ExportBlocks:
    export: Export
    pool: int
    engine: ZCache
    chunked: ChunkedEngine
    wait: ReadWait
    map: BlockMap
    rmw: asyncio.Lock = field(default_factory=asyncio.Lock)
    # nbd_read_lost and nbd_map_not_written: a client reading lost blocks in a loop, or writing
    # on a full disk, must not flood the log
    lost_log: LogThrottle = field(default_factory=lambda: LogThrottle(LOG_SECONDS), init=False)
    map_log: LogThrottle = field(default_factory=lambda: LogThrottle(LOG_SECONDS), init=False)

    def __post_init__(self) -> None:
        self.engine.drop_zero_pages(self.pool)  # a block written as zeros is a hole

    def adopt_index(self) -> int:
        """At the start: the map takes in what the pool's index holds (BlockMap.adopt); the
        number of blocks lost (in a crash)."""
        blocks, lost = self.map.blocks, 0
        objects = set(self.engine.object_ids(self.pool))
        for first in range(0, blocks, INDEX_MASK + 1):
            stop = min(first + INDEX_MASK + 1, blocks)
            held = self._states(first, stop) if first >> OID_BITS in objects else None
            lost += self.map.adopt(first, stop, held)
        return lost

    def _states(self, first: int, stop: int) -> bytes:
        """Per block first..stop-1, whether the pool's index holds a page for it: the bytes of
        page_states(), ABSENT (0) or STORED (1), as the map keeps them."""
        engine, pool = self.engine, self.pool
        parts = []
        for oid in range(first >> OID_BITS, ((stop - 1) >> OID_BITS) + 1):
            base = oid << OID_BITS
            lo, hi = max(first, base), min(stop, base + INDEX_MASK + 1)
            parts.append(engine.page_states(pool, oid, lo - base, hi - base))
        return b"".join(parts)

    def _mark(self, first: int, stop: int, span: Span | None = None) -> bool:
        """Blocks first..stop-1 were written: the map takes what the index now holds there
        (nothing for a block written as zeros, or refused); a rewrite of data as data writes
        nothing.  Both are read here, or cut from `span` (read over a range around these
        blocks in this loop step).  False, logged, if the map could not be written (a full
        disk): the write then fails with ENOSPC, as one whose pages found no room."""
        seen = None if span is None else span.cut(first, stop)
        states = self._states(first, stop) if seen is None else seen[1]
        try:
            mapped = self.map.get(first, stop) if seen is None else seen[0]
            if mapped != states:
                self.map.set(first, states)
        except OSError as exc:
            name = self.export.name
            self.map_log.log("nbd_map_not_written", logging.ERROR, export=name, error=str(exc))
            return False
        return True

    def plan(self, group: Group, start: bool = False) -> WritePlan | None:
        """What run() will do with a WRITE group (None for other groups); with `start`, its
        encoding starts in the codec workers now, for run(group, plan) to file in its turn."""
        return self._write_plan(group.requests, start) if group.kind is WRITE else None

    def _write_plan(self, requests: list[Request], start: bool = False) -> WritePlan:
        keys: list[Key] = []
        runs: list[Piece] = []  # the writes' payloads, coded where they lie
        forget: list[tuple[int, int]] = []
        for request in requests:
            this = type(request)
            if this is Write:
                assert isinstance(request, Write)
                first = request.offset // PAGE_SIZE
                keys += block_keys(first, first + request.length // PAGE_SIZE)
                runs.append(request.data)
            elif this is Trim or this is WriteZeroes:
                forget.append(inner(request.offset, request.length))
        ahead = None
        if start and 0 < len(keys) <= GROUP_PAGES:  # a bigger one goes hop by hop, in its turn
            ahead = self.chunked.encode_ahead(self.pool, keys, runs)
        return WritePlan(keys, runs, forget, ahead)

    async def run(self, group: Group, plan: WritePlan | None = None) -> list[Answer]:
        """The answers to one group, in its order (a WRITE group's as plan() planned it)."""
        try:
            if group.kind is READ:
                return await self._reads(group.requests)
            if group.kind is WRITE:
                return await self._writes(group.requests, plan or self._write_plan(group.requests))
            (request,) = group.requests
            if type(request) is BlockStatus:
                await asyncio.sleep(0)  # the only await: let other connections run between maps
                return [(request, OK, (self._extents(request),))]
            return [(request, await self._alone(request), NO_DATA)]
        except (ZCacheError, OSError) as exc:  # a codec worker failed, the pool was destroyed
            # under it, the block map could not be read...
            log_event("nbd_engine_error", logging.ERROR, export=self.export.name, error=str(exc))
            return [(request, EIO, NO_DATA) for request in group.requests]

    async def _reads(self, requests: list[Request]) -> list[Answer]:
        """Consecutive READs (and FLUSHes) as one get batch."""
        keys: list[Key] = []
        for request in requests:
            if type(request) is Read:
                keys += block_keys(*span(request.offset, request.length))
        got = await self.chunked.get_batch(self.pool, keys, exclusive=False)
        pages, failed = cast(list[Piece], got), set[int]()  # when every block was found
        if set(map(type, got)) != {bytes}:  # at C speed; else misses read as zeros, errors fail
            await self._wait_for_unavailable(keys, got)
            failed = {i for i, p in enumerate(got) if isinstance(p, PageError)}
            if None in got:
                failed.update(self._lost(requests, got))
            pages = [p if type(p) is bytes else HOLE_BLOCK for p in got]
        answers: list[Answer] = []
        at = 0
        for request in requests:
            if type(request) is not Read:
                answers.append((request, OK, NO_DATA))
                continue
            first, stop = span(request.offset, request.length)
            data, mine = pages[at : at + stop - first], range(at, at + stop - first)
            at = mine.stop
            if failed and not failed.isdisjoint(mine):
                answers.append((request, EIO, NO_DATA))
                continue
            skip = request.offset - first * PAGE_SIZE
            if skip or request.length % PAGE_SIZE:
                data = [b"".join(data)[skip : skip + request.length]]
            answers.append((request, OK, data))
        return answers

    def _lost(self, requests: list[Request], got: list[GetResult]) -> list[int]:
        """The places in a read group's `got` of the pages missing whose blocks the map says
        are LOST (in a crash), where the others read as zeros."""
        mapped = b"".join(
            self.map.get(*span(r.offset, r.length)) for r in requests if type(r) is Read
        )
        if LOST not in mapped:
            return []
        lost = [i for i, page in enumerate(got) if page is None and mapped[i] == LOST]
        if lost:
            self.lost_log.log(
                "nbd_read_lost",
                logging.ERROR,
                len(lost),
                export=self.export.name,
                blocks=len(lost),
                why="the node lost these blocks' pages (a crash): written again, they read back",
            )
        return lost

    async def _wait_for_unavailable(self, keys: list[Key], got: list[GetResult]) -> None:
        """Get the pages of `got` that were out of reach again, every READ_RETRY seconds, until
        each came back or the wait is over (or the server stops); `got` is updated in place."""
        wait = self.wait
        missing = [i for i, page in enumerate(got) if isinstance(page, PageUnavailable)]
        if not missing or wait.seconds <= 0:
            return
        name, loop = self.export.name, asyncio.get_running_loop()
        start = loop.time()
        deadline = start + wait.seconds
        log_event(
            "nbd_read_waiting",
            logging.WARNING,
            export=name,
            pages=len(missing),
            why="every copy of these pages is out of reach: waiting for their peers",
        )
        while missing and not wait.stopping() and (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(READ_RETRY, left))
            again = await self.chunked.get_batch(self.pool, [keys[i] for i in missing], False)
            for i, page in zip(missing, again, strict=True):
                got[i] = page
            missing = [i for i in missing if isinstance(got[i], PageUnavailable)]
        waited = round(loop.time() - start, 3)
        if missing:
            wait.counter.labels(name, "failed").inc()
            log_event(
                "nbd_read_failed", logging.ERROR, export=name, pages=len(missing), waited_s=waited
            )
        else:
            wait.counter.labels(name, "resumed").inc()
            log_event("nbd_read_resumed", export=name, waited_s=waited)

    async def _writes(self, requests: list[Request], plan: WritePlan) -> list[Answer]:
        """Aligned WRITEs, WRITE_ZEROES and TRIMs of distinct blocks (and FLUSHes) as one put
        batch and the flush of the zeroed blocks."""
        keys, runs, ahead = plan.keys, plan.runs, plan.ahead
        results = await self.chunked.put_runs(self.pool, keys, runs, ahead) if keys else []
        await self._forget(plan.forget)
        marked = self._map_group(requests, plan.forget)
        if REFUSED.isdisjoint(results) and all(marked):  # as nearly always
            return [(request, OK, NO_DATA) for request in requests]
        answers: list[Answer] = []
        at = writes = 0
        for request in requests:
            error = OK
            if type(request) is Write:
                n = request.length // PAGE_SIZE
                if not marked[writes] or not REFUSED.isdisjoint(results[at : at + n]):
                    error = ENOSPC
                at, writes = at + n, writes + 1
            answers.append((request, error, NO_DATA))
        return answers

    def _map_group(self, requests: list[Request], forget: list[tuple[int, int]]) -> list[bool]:
        """After a WRITE group is stored: the map takes what the index holds at the blocks it
        wrote, zeroed and trimmed; per write, whether its blocks were marked (_mark).  The map
        and the index are read once over the span of those blocks first: a rewrite of data as
        data, or a zeroing of holes, finds them equal there and is done, a pread for the group
        rather than one per write and three per zeroing (~20,000 per GiB of nbdcopy's rewrite
        of the gcc corpus).  Else (new data, a LOST block in the span, a write of another
        connection under way there) each range is brought in step on its own, from what that
        read found (the ranges are disjoint, so a range's write changes no other's bytes)."""
        writes = [
            (request.offset // PAGE_SIZE, (request.offset + request.length) // PAGE_SIZE)
            for request in requests
            if type(request) is Write
        ]
        ranges = writes + [(first, stop) for first, stop in forget if stop > first]
        span = None
        if ranges:
            lo, hi = min(first for first, _ in ranges), max(stop for _, stop in ranges)
            span = self._span(lo, hi) if hi - lo <= SPAN_BLOCKS else None
            if span is not None and span.mapped == span.held:
                return [True] * len(writes)
        for first, stop in forget:
            if span is None:
                self.map.clear(first, stop)
            elif stop > first and span.cut(first, stop)[0].count(HOLE) != stop - first:
                self.map.set(first, bytes(stop - first))
        return [self._mark(first, stop, span) for first, stop in writes]

    def _span(self, first: int, stop: int) -> Span | None:
        """The map's and the index's bytes of blocks first..stop-1; None if the map could not
        be read (each range's own upkeep then says so)."""
        try:
            return Span(first, self.map.get(first, stop), self._states(first, stop))
        except OSError:
            return None

    def _extents(self, request: Request) -> bytes:
        """The base:allocation descriptors of a BLOCK_STATUS, from its offset on: one per run
        of blocks in one state, up to the request's end, STATUS_BLOCKS blocks or STATUS_EXTENTS
        descriptors (one with REQ_ONE)."""
        offset, end = request.offset, request.offset + request.length
        first, stop = span(offset, request.length)
        oid, index = first >> OID_BITS, first & INDEX_MASK
        stop = min(stop, first + STATUS_BLOCKS, (oid + 1) << OID_BITS)  # within one object
        states = self.engine.page_states(self.pool, oid, index, index + stop - first)
        mapped = self.map.get(first, stop)
        if LOST in mapped:  # lost blocks are data: a copy reads them (and fails), not zeros
            held, lost = int.from_bytes(states, "little"), mapped.translate(LOST_AS_STORED)
            states = (held | int.from_bytes(lost, "little")).to_bytes(len(states), "little")
        descriptors = []
        limit = 1 if request.flags & CommandFlag.REQ_ONE else STATUS_EXTENTS
        for run in islice(RUNS.finditer(states), limit):
            lo = max(offset, (first + run.start()) * PAGE_SIZE)
            hi = min(end, (first + run.end()) * PAGE_SIZE)
            descriptors.append(EXTENT.pack(hi - lo, STATUS_FLAGS[states[run.start()]]))
        return b"".join(descriptors)

    async def _alone(self, request: Request) -> Error:
        """An unaligned or empty WRITE or WRITE_ZEROES."""
        if isinstance(request, Write):
            return await self._write(request.offset, request.data)
        assert isinstance(request, WriteZeroes), request
        return await self._zero(request.offset, request.length)

    async def _write(self, offset: int, data: Piece) -> Error:
        if not data:
            return Error.OK
        end = offset + len(data)
        if offset % PAGE_SIZE or end % PAGE_SIZE:
            async with self.rmw:
                return await self._put(offset, data)
        return await self._put(offset, data)

    async def _put(self, offset: int, data: Piece) -> Error:
        """Store `data` at `offset`, reading the partial first and last blocks first."""
        end = offset + len(data)
        first, stop = span(offset, len(data))
        partial = sorted(
            b for b in {first, stop - 1} if b * PAGE_SIZE < offset or (b + 1) * PAGE_SIZE > end
        )
        keys = [block_keys(b, b + 1)[0] for b in partial]
        old = await self.chunked.get_batch(self.pool, keys, False) if partial else []
        await self._wait_for_unavailable(keys, old)
        if any(isinstance(p, PageError) for p in old):
            return Error.EIO
        before = dict(zip(partial, old, strict=True))
        pages: list[Piece] = []
        for block in range(first, stop):
            start = block * PAGE_SIZE - offset  # where this block begins in data (may be < 0)
            if block in before:
                found = before[block]
                page = bytearray(found if isinstance(found, bytes) else HOLE_BLOCK)
                lo, hi = max(start, 0), min(start + PAGE_SIZE, len(data))
                page[lo - start : hi - start] = data[lo:hi]
                pages.append(bytes(page))
            else:
                pages.append(data[start : start + PAGE_SIZE])
        results = await self.chunked.put_batch(self.pool, block_keys(first, stop), pages, True)
        marked = self._mark(first, stop)
        return Error.OK if REFUSED.isdisjoint(results) and marked else Error.ENOSPC

    async def _zero(self, offset: int, length: int) -> Error:
        """Whole blocks are forgotten (they read as zeros); partial edges get zero bytes."""
        end = offset + length
        first, stop = inner(offset, length)
        if first >= stop:  # within one block, or across one boundary only
            return await self._write(offset, bytes(length))
        await self._forget([(first, stop)])
        self.map.clear(first, stop)
        for lo, hi in ((offset, first * PAGE_SIZE), (stop * PAGE_SIZE, end)):
            if hi > lo:
                error = await self._write(lo, bytes(hi - lo))
                if error is not Error.OK:
                    return error
        return Error.OK

    async def _forget(self, ranges: list[tuple[int, int]]) -> None:
        """Flush the blocks of ranges (first, stop) in the engine's steps (flush_keys): a
        short range by its keys, a longer one by the keys its objects hold there (_held).  The
        caller brings the map in step."""
        if ranges:  # most WRITE groups zero nothing
            await self.chunked.flush_keys(self.pool, self._held_keys(ranges))

    def _held_keys(self, ranges: list[tuple[int, int]]) -> Iterator[list[Key]]:
        for first, stop in ranges:
            if stop - first > FLUSH_KEYS:
                yield from self._held(first, stop)
            elif stop > first:
                yield block_keys(first, stop)

    def _held(self, first: int, stop: int) -> Iterator[list[Key]]:
        """The keys of the blocks first..stop-1 that hold a page, FLUSH_KEYS blocks at a time,
        from the pool's index (page_states: a chunk of 64 blocks at C speed); nothing for the
        objects the pool lacks."""
        engine, pool = self.engine, self.pool
        objects = set(engine.object_ids(pool))
        for oid in range(first >> OID_BITS, ((stop - 1) >> OID_BITS) + 1):
            if oid not in objects:
                continue
            base = oid << OID_BITS
            lo, hi = max(first, base), min(stop, base + INDEX_MASK + 1)
            for at in range(lo, hi, FLUSH_KEYS):
                end = min(at + FLUSH_KEYS, hi)
                states = engine.page_states(pool, oid, at - base, end - base)
                yield [
                    k
                    for run in HELD.finditer(states)
                    for k in block_keys(at + run.start(), at + run.end())
                ]


def data_end(engine: ZCache, pool: int) -> int:
    """Where the data a pool holds for an export ends, whatever the export's size: the byte
    after its last block that holds a page (0 if none), from the pool's index (the last
    objects first, each read whole at C speed)."""
    for oid in sorted(engine.object_ids(pool), reverse=True):
        held = engine.page_states(pool, oid, 0, INDEX_MASK + 1).rfind(STORED)
        if held >= 0:
            return ((oid << OID_BITS) + held + 1) * PAGE_SIZE
    return 0
