# The remote index journal: where this owner's remotified zpages have copies, kept on disk so a
# restarted owner finds them again.
#
# The layer's table lives in RAM; this is its durable shadow, an append-only file of fixed
# 32-byte records in the data directory:
#
#     op  u8 | alloc u8 | slot u16 | index u32 | pool u32 | pad u32 | location u64 | value u64
#
#   KEY     location now stands for (pool, oid=value, index), allocator `alloc`
#   HOLDER  location has a copy on the peer in `slot` (the peer stored it and said so)
#   DROP    location no longer has a copy on the peer in `slot`
#   DISK    location has a copy in the local backing file at block `value` (0: none any more)
#   FORGET  location is gone (flushed, overwritten, brought home)
#   HIGH    the highest location generation handed out so far is `value` (written first by a
#           rewrite, so with the KEY records after it replay knows every generation ever used,
#           and a restarted owner never names a new version with an old location)
#
# KEY is written when the zpage is evicted (replay ignores a key that never got a copy); every
# other record only once what it says is true (after the peer's reply, after the disk write),
# with one write() per batch and no fsync: a killed process loses nothing the kernel has
# (a power cut may lose the newest records, which costs at most those copies).  Peer addresses are
# numbered in a small side file (`remote-peers.json`, rewritten atomically when a peer is first
# seen), so a record names a peer in two bytes.
#
# Replay folds the records into one (pool, oid, index, allocator, holders, disk) per live location;
# a torn last record is ignored.  The file is rewritten compactly (ramster/atomicfile.py) at open
# and at a clean close, and whenever it grows past four times its live content, so it stays
# proportional to what is remote.  A full disk stops neither: records that find no room wait in
# memory, in order, for the next commit (a record cut short is taken back, so the file holds
# whole records only, and none is written before the peers file names its slot), and a rewrite
# that finds no room leaves the file as it was.  Before that, the file keeps JOURNAL_ROOM bytes
# allocated past its end (ramster/diskroom.py: blocks a full disk cannot take back), topped up
# once half is used: a disk that fills up still takes ~130,000 records (a discard's FORGET
# records, the HOLDER records of copies already in flight), so they are saved by a stop instead
# of lost with the process; a filesystem that cannot set room aside leaves the records to wait
# as before.  The owner's table keeps no keys (table.py), so a running owner compacts the file
# from itself (`compact`): the KEY records of live locations are kept, their copies written
# afresh from the table.  Entries with no copy anywhere (still in the outbox at a crash) are not
# recovered: their only copy was in RAM.
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ramster.atomicfile import NO_SPACE, replace_file
from ramster.diskroom import keep_room
from ramster.zcache.config import ALLOCATORS

RECORD = struct.Struct("<BBHIIxxxxQQ")
_LOCATION = struct.Struct("<16xQ")  # a record's location field alone
KEY, HOLDER, DROP, DISK, FORGET, HIGH = range(1, 7)
GEN_SHIFT = 32  # a location is generation << 32 | slot (see table.py)
JOURNAL_FILE = "remote.journal"
PEERS_FILE = "remote-peers.json"
MAX_SLOTS = 1 << 16
REWRITE_CHUNK = 1 << 20  # bytes a rewrite buffers before writing them
JOURNAL_ROOM = 8 << 20  # bytes kept allocated past the end of the file, for a full disk


class JournalError(Exception):
    """The journal cannot be read or written; the message says why."""


class JournalFull(JournalError):
    """The journal's disk is full (or its quota used up): a rewrite could not be written."""


@dataclass
class Recovered:
    """One live location as the journal last knew it."""

    pool_id: int
    allocator: str
    oid: int
    index: int
    holders: set[str] = field(default_factory=set)
    disk: int = 0


class Journal:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / JOURNAL_FILE
        self.peers_path = data_dir / PEERS_FILE
        self.slots: dict[str, int] = {}
        self._buffer = bytearray()
        self._records = 0
        self.saved = 0  # records written since open, never reset: `appended` is what they reach
        self._fd = -1
        self._room_end = 0  # the file's blocks are allocated up to here (keep_room)
        self.torn = 0
        self.high_gen = 0  # the highest location generation ever handed out
        try:
            if self.peers_path.exists():
                self.slots = {str(a): int(s) for a, s in json.loads(self.peers_path.read_text())}
        except (OSError, ValueError, TypeError) as exc:
            raise JournalError(f"cannot read {self.peers_path}: {exc}") from None
        self.unwritten = False  # records wait in memory: the disk was full at the last commit
        self.not_compacted = False  # the file could not be rewritten at open (disk full)
        self._slots_saved = True  # the peers file names every slot records may use
        self.on_unwritten: Callable[[bool, int], None] = lambda waiting, records: None
        self.recovered = self._replay()
        try:
            self.rewrite(self.recovered)
        except JournalFull:  # keep the file as it is: it says the same, only less compactly
            if not self.path.exists():
                raise
            self._append(self.path.stat().st_size // RECORD.size)
            self.not_compacted = True

    # -- replay and compaction --------------------------------------------------------------
    def _replay(self) -> dict[int, Recovered]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise JournalError(f"cannot read {self.path}: {exc.strerror}") from None
        names = {s: a for a, s in self.slots.items()}
        live: dict[int, Recovered] = {}
        whole = len(data) - len(data) % RECORD.size
        self.torn = int(whole != len(data))
        for op, alloc, slot, index, pool, location, value in RECORD.iter_unpack(data[:whole]):
            if op == KEY and alloc < len(ALLOCATORS):
                live[location] = Recovered(pool, ALLOCATORS[alloc], value, index)
                self.high_gen = max(self.high_gen, location >> GEN_SHIFT)
                continue
            if op == HIGH:
                self.high_gen = max(self.high_gen, value)
                continue
            entry = live.get(location)
            if entry is None:
                continue
            if op == HOLDER and slot in names:
                entry.holders.add(names[slot])
            elif op == DROP and slot in names:
                entry.holders.discard(names[slot])
            elif op == DISK:
                entry.disk = value
            elif op == FORGET:
                del live[location]
            else:
                self.torn += 1
        return {loc: e for loc, e in live.items() if e.holders or e.disk}

    def rewrite(self, entries: Mapping[int, Recovered], high_gen: int = 0) -> None:
        """Replace the file by the records of `entries` alone (and the generation mark)."""
        self._write(
            (
                self._key(location, e.pool_id, ALLOCATORS.index(e.allocator), e.oid, e.index)
                + self._copies(location, e.holders, e.disk)
                for location, e in entries.items()
            ),
            high_gen,
        )

    def compact(
        self, state: Callable[[int], tuple[Iterable[str], int] | None], high_gen: int
    ) -> None:
        """Rewrite the file from itself: the KEY record of every location `state` knows, then
        its copies as `state` gives them (holders, disk block); None: the location is gone.
        The owner's table knows where copies are but not the keys, which only this file has;
        the file is read in pieces, so compacting a million locations builds no million
        objects at once."""
        self.commit()

        def records() -> Iterator[bytes]:
            step = REWRITE_CHUNK - REWRITE_CHUNK % RECORD.size
            with open(self.path, "rb") as f:
                while chunk := f.read(step):
                    whole = len(chunk) - len(chunk) % RECORD.size
                    for at in range(0, whole, RECORD.size):
                        op, location = chunk[at], _LOCATION.unpack_from(chunk, at)[0]
                        if op == KEY and (copies := state(location)) is not None:
                            yield chunk[at : at + RECORD.size] + self._copies(location, *copies)

        try:
            self._write(records(), high_gen)
        except JournalFull:  # the file goes on as it is; try again once it has grown as much
            self._live_at_rewrite = max(1, self._records)
        except OSError as exc:
            raise JournalError(f"cannot read {self.path}: {exc.strerror}") from None

    def _copies(self, location: int, holders: Iterable[str], disk: int) -> bytes:
        out = b"".join(self._holder(location, self.slot(address)) for address in holders)
        return out + RECORD.pack(DISK, 0, 0, 0, 0, location, disk) if disk else out

    def _write(self, blocks: Iterable[bytes], high_gen: int) -> None:
        """Replace the file by the generation mark and `blocks` of records, written in pieces
        of REWRITE_CHUNK bytes (replace_file: the old file or the new, never half)."""
        self.high_gen = max(self.high_gen, high_gen)

        def pieces() -> Iterator[bytearray]:
            out = bytearray(RECORD.pack(HIGH, 0, 0, 0, 0, 0, self.high_gen))
            for block in blocks:
                out += block
                if len(out) >= REWRITE_CHUNK:
                    yield out
                    out.clear()
            yield out

        try:
            self._append(replace_file(self.path, pieces()) // RECORD.size)
        except OSError as exc:
            error = JournalFull if exc.errno in NO_SPACE else JournalError
            raise error(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, records: int) -> None:
        """Go on appending to the file as it now is, `records` long: the base that the next
        rewrite waits for it to outgrow four times (wants_rewrite)."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._records = records
        self._live_at_rewrite = max(1, records)
        self._room_end = 0
        self._keep_room()

    def _keep_room(self) -> None:
        """Top the room past the end of the file up to JOURNAL_ROOM once under half of it."""
        end = self._records * RECORD.size
        if self._room_end - end < JOURNAL_ROOM // 2 and keep_room(self._fd, end, JOURNAL_ROOM):
            self._room_end = end + JOURNAL_ROOM

    # -- records ----------------------------------------------------------------------------
    def slot(self, address: str) -> int:
        slot = self.slots.get(address)
        if slot is None:
            if len(self.slots) >= MAX_SLOTS:
                raise JournalError(f"more than {MAX_SLOTS} peer addresses in the journal")
            slot = self.slots[address] = len(self.slots)
            self._slots_saved = False
            self._save_slots()
        return slot

    def _save_slots(self) -> None:
        """Rewrite the peers file (replace_file); with the disk full it is left for commit()
        to try again, which writes no record until it is saved (a record of a slot the file
        does not name would be dropped on replay)."""
        slots = sorted(self.slots.items(), key=lambda kv: kv[1])
        try:
            replace_file(self.peers_path, json.dumps(slots).encode())
            self._slots_saved = True
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise

    @staticmethod
    def _key(location: int, pool_id: int, alloc: int, oid: int, index: int) -> bytes:
        """A KEY record: `location` stands for page (oid, index) of pool `pool_id`, whose
        allocator is ALLOCATORS[alloc]."""
        return RECORD.pack(KEY, alloc, 0, index, pool_id, location, oid)

    @staticmethod
    def _holder(location: int, slot: int) -> bytes:
        """A HOLDER record: the peer of address slot `slot` holds a copy of `location`."""
        return RECORD.pack(HOLDER, 0, slot, 0, 0, location, 0)

    def keys(
        self, locations: list[int], pool_id: int, allocator: str, keys: list[tuple[int, int]]
    ) -> None:
        """KEY records: each of `locations` stands for the page of its (oid, index) in `keys`."""
        alloc, key = ALLOCATORS.index(allocator), self._key
        self._buffer += b"".join(
            [
                key(location, pool_id, alloc, oid, index)
                for location, (oid, index) in zip(locations, keys, strict=True)
            ]
        )

    def holders(self, locations: Iterable[int], address: str) -> None:
        """HOLDER records for copies of `locations` on `address` (a put's reply)."""
        slot, holder = self.slot(address), self._holder
        self._buffer += b"".join([holder(location, slot) for location in locations])

    def drop(self, location: int, address: str) -> None:
        self._buffer += RECORD.pack(DROP, 0, self.slot(address), 0, 0, location, 0)

    def disk(self, location: int, block: int) -> None:
        self._buffer += RECORD.pack(DISK, 0, 0, 0, 0, location, block)

    def forget(self, location: int) -> None:
        self._buffer += RECORD.pack(FORGET, 0, 0, 0, 0, location, 0)

    def commit(self) -> None:
        """Write the buffered records (one write, unless the kernel takes part of it).  With
        the disk full, what was not written stays buffered, in order, for the next commit, and
        a record cut short is taken back, so that the file holds whole records only."""
        buffer = self._buffer
        if not buffer or self._fd < 0:
            return
        if not self._slots_saved:
            self._save_slots()
        done = 0
        try:
            while done < len(buffer) and self._slots_saved:
                done += os.write(self._fd, buffer[done:] if done else buffer)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            cut = done % RECORD.size
            if cut:  # (which drops the room past the end too)
                os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - cut)
                done -= cut
                self._room_end = 0
        self._records += done // RECORD.size
        self.saved += done // RECORD.size
        del buffer[:done]
        self._keep_room()
        if bool(buffer) != self.unwritten:
            self.unwritten = bool(buffer)
            self.on_unwritten(self.unwritten, len(buffer) // RECORD.size)

    def wants_rewrite(self, live_records: int) -> bool:
        return self._records > 4 * max(live_records, self._live_at_rewrite, 1024)

    @property
    def waiting(self) -> int:
        """Records buffered, not written yet."""
        return len(self._buffer) // RECORD.size

    @property
    def appended(self) -> int:
        """Records made since open: each is on disk once `saved` reaches its number."""
        return self.saved + self.waiting

    def close(self) -> None:
        """Write what is buffered and close.  Records still `waiting` then (the disk is full)
        are lost: the copies they tell of are not found again at the next start."""
        self.commit()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
