# The backing file: the node's swap disk, the last evictor in the chain.
#
# Persistent zpages are written back still compressed, each as one *record* starting on a
# 512-byte block boundary:
#
#     +------+-----+-----+---------+-----+------+----------------------------------+
#     | RZP1 | alc | pad | pool id | seq | hsum | zpage (its own header + payload) |
#     |  4   |  1  |  3  |    4    |  8  |  4   |  18 + length                     |
#     +------+-----+-----+---------+-----+------+----------------------------------+
#
# `hsum` covers the record header and the zpage header; the zpage's own checksum covers its key
# and payload.  A record's location is its first block.  Free extents are kept in lists by size
# (1..9 blocks); allocation takes an exact fit, then grows the file, then splits a larger extent,
# so freed space is reused.  A flush overwrites the record's magic before its blocks are reused,
# so a flushed page can never come back.
#
# Recovery needs no log: on open the file is scanned for records (`find` on the magic, checked on
# block boundaries).  A record whose header checksum fails is torn (a crash in the middle of a
# pwrite, or damage to its header): its key cannot be trusted, so it is dropped, counted, and its
# blocks become free space.  A record whose header holds but whose payload fails the zpage
# checksum is kept: its key is known, so a get of it reports the damage (CorruptPage, DATA_LOSS to
# a client) instead of a silent miss.  If a key appears twice (a
# crash between writing a new record and killing the old one), the higher sequence number wins.
# The superblock records whether the last stop was clean: a graceful close fsyncs and sets it, so
# there is nothing to redo; after a crash the scan reports how many torn records it dropped.
#
# Writes: the records of one evict() call that land in adjacent blocks (all of a batch that goes
# past the last record; freed extents, taken first, break runs) go to disk in one pwrite.  One
# pwrite per record spent ~2.8 us per record in the call itself, more than the kernel's copy of
# its bytes; a 1 GiB stop of a real node went from 2.4-4.0 s to 1.8-2.4 s.  When the disk fills
# in the middle of a run, the records written whole are taken, the rest are refused, and the
# magic of the one written in part is overwritten, so a later scan never takes a torn record for
# a damaged page.
#
# Trade-off: no fsync per write (a process crash loses nothing the kernel has; a power cut may lose
# the latest write-backs, which the scan then detects), and an open costs one pass over the file.
#
# Room to save RAM (cover): a node that stops gracefully writes every persistent page it holds in
# RAM here (ZCache.write_back_all).  On a full disk those pages were lost.  So the file keeps
# room allocated past its last record (posix_fallocate: blocks the filesystem has set aside, so a
# write there is not refused for space) for all that RAM holds, and the engine asks cover()
# before it takes more pages into RAM: when the room cannot grow, the put is refused (an NBD
# write fails with ENOSPC) rather than taken into RAM that a stop could not save.  The bound: a
# record of an n-byte zpage takes ceil((RECORD_HEAD + n) / BLOCK) <= 1 + (RECORD_HEAD + n) /
# BLOCK blocks, and zpages fill at most their frames, so `pages` pages in `frames` frames need
# at most pages * (1 + RECORD_HEAD / BLOCK) + frames * PAGE_SIZE / BLOCK blocks (a raw page, one
# per frame: 9, which its record takes).  Only the tail past the last record counts, not the
# free extents between records (a record may fit none of them).  The room is taken ROOM_STEP
# at a time, so puts seldom cost a syscall, and given back at close (and on open).  Trade-off:
# the disk holds about the compressed size of RAM's persistent pages more than the records, and
# a node whose disk cannot take that refuses pages that its RAM, or its peers, had room for.
from __future__ import annotations

import contextlib
import mmap
import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE, zpage_bytes, zpage_key, zpage_length
from ramster.zcache.config import ALLOCATORS
from ramster.zcache.errors import CorruptPage, ZCacheError

BLOCK = 512
SUPER_BLOCKS = PAGE_SIZE // BLOCK
SUPER = struct.Struct("<16sIB")
SUPER_MAGIC = b"RAMSTER-BACKING\n"
VERSION = 1
RECORD = struct.Struct("<4sB3xIQ")
RECORD_MAGIC = b"RZP1"
_HSUM = struct.Struct("<I")
RECORD_HEAD = RECORD.size + _HSUM.size
MAX_BLOCKS = (RECORD_HEAD + HEADER_SIZE + PAGE_SIZE + BLOCK - 1) // BLOCK
ROOM_STEP = 8192  # blocks (4 MiB) of room to save RAM allocated at once, if the disk has them
_xxh = xxhash.xxh3_64_intdigest


class BackingFileError(ZCacheError):
    """The backing file cannot be opened or is not a RAMster backing file."""


@dataclass
class BackingStats:
    written_back: int = 0  # records written
    loaded: int = 0  # records read back
    forgotten: int = 0  # records killed (flush, overwrite, promotion)
    refused_full: int = 0  # zpages refused because the file reached its limit
    write_errors: int = 0  # zpages refused because the write failed (e.g. disk full)
    corrupt: int = 0  # records that failed verification when loaded
    recovered: int = 0  # records found on open
    torn: int = 0  # invalid records dropped on open
    damaged: int = 0  # records kept on open whose payload fails its checksum (reported on get)
    was_clean: bool = True  # the previous stop was graceful (or the file is new)


def _hsum(head: bytes, zpage: bytes | memoryview) -> int:
    return _xxh(head + bytes(zpage[:HEADER_SIZE])) & 0xFFFFFFFF


class BackingFile:
    """Compressed persistent zpages on disk, with a block allocator and crash recovery."""

    def __init__(self, path: str | os.PathLike[str], limit_bytes: int = 0) -> None:
        self.path = Path(path)
        self.limit_blocks = limit_bytes // BLOCK if limit_bytes else 1 << 52
        self.stats = BackingStats()
        self._free = [array("Q") for _ in range(MAX_BLOCKS + 1)]
        self._sizes = bytearray()  # blocks of the live record starting at each block, else 0
        self._seq = 0
        self.live = 0  # live records
        self._recovered: dict[int, tuple[int, str, int, int, int]] = {}  # by block
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BackingFileError(
                f"cannot open backing file {self.path}: {exc.strerror}"
            ) from None
        try:
            self._open()
        except BaseException:
            os.close(self.fd)
            raise

    # -- open and recovery ------------------------------------------------------------------
    def _open(self) -> None:
        size = os.fstat(self.fd).st_size
        if size == 0:
            self._write_super(clean=False)
            self._bump = self._room = SUPER_BLOCKS
            self._sizes = bytearray(SUPER_BLOCKS)
            return
        magic, version, clean = SUPER.unpack(os.pread(self.fd, SUPER.size, 0).ljust(SUPER.size))
        if magic != SUPER_MAGIC:
            raise BackingFileError(f"{self.path} is not a RAMster backing file")
        if version != VERSION:
            raise BackingFileError(f"{self.path} has format version {version}, not {VERSION}")
        self.stats.was_clean = bool(clean)
        self._scan(size)
        self._write_super(clean=False)

    def _scan(self, size: int) -> None:
        nblocks = (size + BLOCK - 1) // BLOCK  # a torn last write may leave a partial block
        self._sizes = bytearray(nblocks)
        if nblocks <= SUPER_BLOCKS:
            self._bump = self._room = SUPER_BLOCKS
            self._sizes = bytearray(SUPER_BLOCKS)
            return
        live: dict[tuple[int, int, int], tuple[int, int]] = {}  # key -> (seq, block)
        found: list[tuple[int, str, int, int, int]] = []
        with mmap.mmap(self.fd, size, access=mmap.ACCESS_READ) as mm:
            pos = mm.find(RECORD_MAGIC, SUPER_BLOCKS * BLOCK)
            while pos >= 0:
                if pos % BLOCK:
                    pos = mm.find(RECORD_MAGIC, pos + 1)
                    continue
                parsed = self._parse(mm, pos)
                if parsed is None:
                    self.stats.torn += 1
                    pos = mm.find(RECORD_MAGIC, pos + 1)
                    continue
                pool_id, alloc, seq, oid, index, blocks, intact = parsed
                self.stats.damaged += not intact
                block = pos // BLOCK
                key = (pool_id, oid, index)
                older = live.get(key)
                if older is None or older[0] < seq:
                    if older is not None:
                        self._sizes[older[1]] = 0
                    live[key] = (seq, block)
                    self._sizes[block] = blocks
                    found.append((pool_id, alloc, oid, index, block))
                self._seq = max(self._seq, seq)
                pos = mm.find(RECORD_MAGIC, pos + blocks * BLOCK)
        self._recovered = {r[4]: r for r in found if live[(r[0], r[2], r[3])][1] == r[4]}
        self.stats.recovered = self.live = len(self._recovered)
        for stale in {b for *_, b in found} - {b for _, b in live.values()}:
            os.pwrite(self.fd, b"\0\0\0\0", stale * BLOCK)  # superseded: never resurrect it
        self._rebuild_free([b for _, b in live.values()])

    @staticmethod
    def _parse(mm: mmap.mmap, pos: int) -> tuple[int, str, int, int, int, int, bool] | None:
        head = mm[pos : pos + RECORD.size]
        if len(head) < RECORD.size:
            return None
        _, alloc_code, pool_id, seq = RECORD.unpack(head)
        zpage = mm[pos + RECORD_HEAD : pos + RECORD_HEAD + HEADER_SIZE + PAGE_SIZE]
        (hsum,) = _HSUM.unpack_from(mm, pos + RECORD.size)
        if alloc_code >= len(ALLOCATORS) or _hsum(head, zpage) != hsum:
            return None
        # a payload that fails its checksum is kept (its key is known) unless the file ends
        # inside it: that is a write the crash cut short
        intact = zpage_length(zpage)
        length = intact or HEADER_SIZE + int.from_bytes(zpage[4:6], "little")
        if length > min(len(zpage), HEADER_SIZE + PAGE_SIZE):
            return None
        oid, index = zpage_key(zpage)
        blocks = (RECORD_HEAD + length + BLOCK - 1) // BLOCK
        return pool_id, ALLOCATORS[alloc_code], seq, oid, index, blocks, bool(intact)

    def _rebuild_free(self, live_blocks: list[int]) -> None:
        """Free extents are the gaps between live records; the file ends after the last one."""
        end = SUPER_BLOCKS
        for block in sorted(live_blocks):
            self._free_range(end, block)
            end = block + self._sizes[block]
        self._bump = self._room = end
        del self._sizes[end:]
        os.ftruncate(self.fd, end * BLOCK)  # and the room a crash left: cover() takes it again

    def _free_range(self, start: int, stop: int) -> None:
        while start < stop:
            n = min(MAX_BLOCKS, stop - start)
            self._free[n].append(start)
            start += n

    def _write_super(self, clean: bool) -> None:
        os.pwrite(self.fd, SUPER.pack(SUPER_MAGIC, VERSION, int(clean)).ljust(PAGE_SIZE, b"\0"), 0)
        os.fsync(self.fd)

    # -- block allocation -------------------------------------------------------------------
    def _alloc(self, n: int) -> int:
        free = self._free
        if free[n]:
            return free[n].pop()
        if self._bump + n <= self.limit_blocks:
            block = self._bump
            self._bump += n
            self._sizes.extend(bytes(n))
            return block
        for m in range(n + 1, MAX_BLOCKS + 1):
            if free[m]:
                block = free[m].pop()
                free[m - n].append(block + n)
                return block
        return 0

    def _kill(self, block: int) -> None:
        """Overwrite a record's magic and return its blocks to the free lists."""
        self._unmark(block)
        self._release(block, self._sizes[block])

    def _unmark(self, block: int) -> None:
        """Overwrite the magic of the record at `block`: a scan no longer finds it."""
        os.pwrite(self.fd, bytes(len(RECORD_MAGIC)), block * BLOCK)

    def _release(self, block: int, blocks: int) -> None:
        self._free_range(block, block + blocks)
        self._sizes[block] = 0
        self.live -= 1

    # -- room to save RAM ---------------------------------------------------------------------
    def cover(self, pages: int, frames: int) -> bool:
        """Whether the room past the last record holds `pages` pages kept in `frames` frames of
        RAM (see the header), after allocating more of the disk if it did not: False if the
        disk, or the file's limit, cannot give that much."""
        need = pages + (pages * RECORD_HEAD + frames * PAGE_SIZE + BLOCK - 1) // BLOCK
        short = need - max(0, self._room - self._bump)
        if short <= 0:
            return True
        start = max(self._room, self._bump)
        # a step, else just what is missing
        for grow in (ROOM_STEP, short) if short < ROOM_STEP else (short,):
            grow = min(grow, self.limit_blocks - start)
            if grow < short:
                return False
            try:
                os.posix_fallocate(self.fd, start * BLOCK, grow * BLOCK)
            except OSError:
                continue
            self._room = start + grow
            return True
        return False

    @property
    def room_bytes(self) -> int:
        """Disk allocated past the last record, for saving RAM at a stop."""
        return max(0, self._room - self._bump) * BLOCK

    # -- evictor interface ------------------------------------------------------------------
    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        code = ALLOCATORS.index(allocator)
        out: list[int] = []
        run = bytearray()  # records in adjacent blocks, written in one call
        start, members = 0, list[int]()  # the run's first block; its records' places in out
        for zpage in zpages:
            blocks = (RECORD_HEAD + len(zpage) + BLOCK - 1) // BLOCK
            block = self._alloc(blocks)
            if not block:
                self.stats.refused_full += 1
                out.append(0)
                continue
            if run and block != start + len(run) // BLOCK:
                self._write_run(start, run, members, out)
                run, members = bytearray(), []
            if not run:
                start = block
            self._seq += 1
            head = RECORD.pack(RECORD_MAGIC, code, pool_id, self._seq)
            run += head
            run += _HSUM.pack(_hsum(head, zpage))
            run += zpage
            run += bytes(-len(run) % BLOCK)
            self._sizes[block] = blocks
            self.live += 1
            members.append(len(out))
            out.append(block)
        if run:
            self._write_run(start, run, members, out)
        return out

    def _write_run(self, start: int, run: bytearray, members: list[int], out: list[int]) -> None:
        """Write records laid out from block `start` in one call; a record not wholly written
        (disk full or failing) is refused: its blocks go back, its zpage stays in RAM, and the
        magic of one written in part is overwritten (as far as the disk lets), so a scan never
        finds it."""
        try:
            written = os.pwrite(self.fd, run, start * BLOCK)
        except OSError:
            written = -1  # how much reached the disk is unknown
        if written == len(run):
            self.stats.written_back += len(members)
            return
        for at in members:
            block = out[at]
            blocks, offset = self._sizes[block], (block - start) * BLOCK
            if written >= 0 and offset + blocks * BLOCK <= written:
                self.stats.written_back += 1
                continue
            if written < 0 or offset < written:
                with contextlib.suppress(OSError):
                    self._unmark(block)
            self._release(block, blocks)
            self.stats.write_errors += 1
            out[at] = 0

    def load(self, pool_id: int, location: int) -> bytes:
        blocks = self._sizes[location] if location < len(self._sizes) else 0
        data = os.pread(self.fd, blocks * BLOCK, location * BLOCK) if blocks else b""
        if len(data) < RECORD_HEAD + HEADER_SIZE or data[:4] != RECORD_MAGIC:
            self.stats.corrupt += 1
            raise CorruptPage(f"backing file holds no record at block {location}")
        head = data[: RECORD.size]
        _, _, rec_pool, _ = RECORD.unpack(head)
        zpage = zpage_bytes(memoryview(data)[RECORD_HEAD:])
        if rec_pool != pool_id or _hsum(head, zpage) != _HSUM.unpack_from(data, RECORD.size)[0]:
            self.stats.corrupt += 1
            raise CorruptPage(f"backing file record at block {location} is damaged")
        self.stats.loaded += 1
        return zpage

    def forget(self, pool_id: int, locations: list[int]) -> None:
        for location in locations:
            self._kill(location)
        self.stats.forgotten += len(locations)

    def recovered(self) -> Iterator[tuple[int, str, int, int, int]]:
        records, self._recovered = self._recovered, {}
        yield from records.values()

    def claim(self, pool_id: int, location: int, oid: int, index: int) -> bool:
        """Take the record found on open at `location` as another evictor's (the ramster
        layer's disk copy of a remote zpage): `recovered()` will not announce it.  False if
        no such record of that key survived."""
        record = self._recovered.get(location)
        if record is None or (record[0], record[2], record[3]) != (pool_id, oid, index):
            return False
        del self._recovered[location]
        return True

    # -- introspection and shutdown ---------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._bump * BLOCK

    def close(self) -> None:
        """Flush everything and mark the file clean: the next open has nothing to redo."""
        if self.fd < 0:
            return
        if self._room > self._bump:  # the room to save RAM goes back to the disk
            os.ftruncate(self.fd, self._bump * BLOCK)
        os.fsync(self.fd)
        self._write_super(clean=True)
        os.close(self.fd)
        self.fd = -1
