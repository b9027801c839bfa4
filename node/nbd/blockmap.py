# Which blocks of an export hold data its clients wrote: a byte per block (DATA, HOLE: reads as
# zeros, LOST), in a file of the node's data directory.
#
# Why: a block that holds no page reads as zeros, which is right for a block never written,
# trimmed or zeroed, and wrong for one whose page the node lost.  A crash (SIGKILL, OOM kill)
# loses the pages that were in RAM alone; before this map, their blocks read back as zeros after
# the restart, with no error: an acknowledged write silently undone, which a filesystem takes
# for its data and a kernel swapping to the export for a process's memory.  With it, a block
# the map says holds data but the engine has no page for at the start becomes LOST, and reads
# as EIO (node/nbd/blocks.py) until the client writes, zeroes or trims it.
#
# Kept in step with the pool's index: after each write, zeroing or trim of a range, and before its
# reply, the range's bytes become what the index holds there (a block written as zeros, or
# refused, holds nothing); a write that finds the map's bytes as they should be writes nothing.
# So a write the client was told succeeded is in the map before the client learns it, and one
# whose reply never left may or may not be (its range is unspecified then anyway).  The file is
# read and written with pread and pwrite: what pwrite returned from is in the kernel's page
# cache, so the map outlives the process however it dies; like the backing file it is not
# fsynced, so a power cut may lose its latest changes.  (A shared mapping of it cost no syscall
# per write, but a store into a part the filesystem had no block for, and on tmpfs even a read of
# one, faulted a block in, and on a full disk that fault was a SIGBUS: a node whose tmpfs data
# directory was full died serving a write, then a read.  pwrite says ENOSPC, and the write that
# needed it fails with ENOSPC; the file stays sparse, so a thin export costs no disk up front.)
# At the start the map takes in what the index holds (a page that came back from disk or a peer
# is data, whatever the map said), and the blocks it says hold data that the index lacks become
# LOST.  Only the start makes a block LOST: a read that found no page while a write of the block
# was under way (its page not filed yet, or a write of zeros that emptied it before the map says
# so) reads zeros, as a concurrent read may, rather than an error.
#
# Layout: a HEADER_SIZE-byte header (MAGIC, VERSION), then one byte per block.  The file follows
# the export's declared size (grown with zeros, or cut) at each start; a missing one is made from
# the index, so an export from before the map starts with what its pool holds.  Without a data
# directory (tests) the map is in memory.  Trade-off: a byte per 4 KiB block (256 KiB per GiB of
# export written) rather than two bits, so a written range's state is one slice of the index's
# own page_states() bytes; the file's size bounds an export's (16 TiB, ext4's most, maps 64 PiB).
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ramster.atomicfile import replace_file

MAGIC = b"RAMSTER-NBD-MAP\n"
VERSION = b"\x01"
HEADER_SIZE = 4096  # the map starts on a page of its own
HOLE, DATA, LOST = 0, 1, 2  # a block's byte (HOLE and DATA: the index's ABSENT and STORED)
STEP = 1 << 20  # blocks read or cleared at once (a MiB of the map)
SHORT = 4096  # blocks a clear reads whole (a page of the map)
_ZEROS = bytes(STEP)
# adopt(): 2 * the map's byte + the index's to the new byte (a page: DATA; none: LOST if the map
# said DATA or LOST, else HOLE)
_ADOPTED = bytes([HOLE, DATA, LOST, DATA, LOST, DATA]).ljust(256, b"\0")


def map_path(data_dir: Path, pool: int) -> Path:
    """The map file of the export whose pool is `pool` (ids are never reused, names may hold
    any character)."""
    return data_dir / f"nbd-pool-{pool}.map"


class BlockMap:
    """The map of an export of `blocks` blocks: in the file `path` (made empty if missing), or
    in memory with no path; adopt() then takes in what the index holds.  Reads and writes of
    the file raise OSError, worded with its path."""

    def __init__(self, path: Path | None, blocks: int) -> None:
        self.blocks = blocks
        self.path = path
        self._fd = -1
        self._memory = bytearray(blocks if path is None else 0)
        if path is None:
            return
        try:
            if not path.exists():
                replace_file(path, (MAGIC + VERSION).ljust(HEADER_SIZE, b"\0"))
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            if os.pread(self._fd, len(MAGIC) + len(VERSION), 0) != MAGIC + VERSION:
                raise ValueError(
                    f"{path} is not an NBD block map of this version: move it away, and the "
                    "node makes a new one from what the export's pool holds (blocks lost in an "
                    "earlier crash then read as zeros)"
                )
            os.ftruncate(self._fd, HEADER_SIZE + blocks)  # the declared size: grown, or cut
        except BaseException as exc:
            if self._fd >= 0:
                os.close(self._fd)
            raise self._worded(exc) if isinstance(exc, OSError) else exc from None

    def get(self, first: int, stop: int) -> bytes:
        """The bytes of blocks first..stop-1."""
        if self._fd < 0:
            return bytes(self._memory[first:stop])
        try:
            return os.pread(self._fd, stop - first, HEADER_SIZE + first)
        except OSError as exc:
            raise self._worded(exc) from None

    def set(self, first: int, states: bytes) -> None:
        """Blocks from `first` on take `states` (a byte each: HOLE, DATA or LOST)."""
        if self._fd < 0:
            self._memory[first : first + len(states)] = states
            return
        try:
            written = os.pwrite(self._fd, states, HEADER_SIZE + first)
        except OSError as exc:
            raise self._worded(exc) from None
        if written < len(states):  # a short write: no room for the rest
            raise self._worded(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def clear(self, first: int, stop: int) -> None:
        """Blocks first..stop-1 are HOLEs; the parts of the map that are all HOLE already are
        not written (a long range is read only where the file holds data; a short one is read
        whole, a pread being cheaper than the two lseeks that would find its data)."""
        extents = [(first, stop)] if stop - first <= SHORT else self._data(first, stop)
        for lo, hi in extents:
            for at in range(lo, hi, STEP):
                end = min(at + STEP, hi)
                if self.get(at, end) != _ZEROS[: end - at]:
                    self.set(at, _ZEROS[: end - at])

    def adopt(self, first: int, stop: int, held: bytes | None) -> int:
        """At the start, blocks first..stop-1 take in what the index holds there (`held`, a
        byte each, DATA for a page; None: nothing): a block with a page holds DATA, one that
        held data without (DATA or LOST) is LOST.  The number of LOST blocks.  With nothing
        held, only the parts of the file that hold data are read (a map of a big, mostly
        empty export is mostly holes)."""
        lost = 0
        extents = self._data(first, stop) if held is None else [(first, stop)]
        for lo, hi in extents:
            mapped = self.get(lo, hi)
            seen = held[lo - first : hi - first] if held is not None else bytes(hi - lo)
            # 2 * map + held, a byte each (at most 5: no carry), to the block's new state
            both = 2 * int.from_bytes(mapped, "little") + int.from_bytes(seen, "little")
            now = both.to_bytes(hi - lo, "little").translate(_ADOPTED)
            if now != mapped:
                self.set(lo, now)
            lost += now.count(LOST)
        return lost

    def _data(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """The extents of blocks first..stop-1 whose part of the map's file holds data
        (SEEK_DATA; the rest reads as HOLEs); the whole range in memory."""
        if self._fd < 0:
            yield first, stop
            return
        at, hi = HEADER_SIZE + first, HEADER_SIZE + stop
        while at < hi:
            try:
                start = os.lseek(self._fd, at, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: no data past `at`
                if exc.errno == errno.ENXIO:
                    return
                raise self._worded(exc) from None
            if start >= hi:
                return
            at = min(os.lseek(self._fd, start, os.SEEK_HOLE), hi)
            yield start - HEADER_SIZE, at - HEADER_SIZE

    def _worded(self, exc: OSError) -> OSError:
        return OSError(exc.errno, f"block map {self.path}: {exc.strerror or exc}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
