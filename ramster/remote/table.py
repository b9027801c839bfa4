# The owner's remote table: per remotified zpage, its pool, its holders and its disk copy, in
# arrays rather than objects, so parking a page on a peer costs the owner a few bytes.
#
# A location is `generation << 32 | slot`.  Slots index these columns:
#
#     gen     u16  the slot's generation (a location names one version of one page)
#     pool    u8   the pool's number (0: an unused slot); pools are numbered in order of use
#     holders u8   a bitmask over peer bits (address -> bit, at most 32 peers hold our pages)
#     disk    u32  the backing-file block of the page's disk copy (0: none)
#
# Columns are as narrow as their values allow and widen when they must: `pool` and `holders`
# start at one byte and become u16 and u32 past 255 pools with remote pages or 8 holding peers;
# `disk` exists only while some page has a disk copy (with peers enough for every replica there
# is none).  An owner with a few pools and up to 8 peers pays 4 bytes per remote page here, and
# a widening costs one pass over a column, once.
#
# The page's key is not here: zcache's index maps the key to the location, holders file copies
# under the slot (the peer API names copies by slot, and the seal binds the whole location), and
# the journal recorded the key when the page was evicted.  A slot is reused for another page
# only after the old page's flushes are owed to its holders, and a holder gets a peer's flushes
# before its later puts, so a slot on a holder never names two pages at once.
#
# Freed slots are reused (a free list), with their generation bumped (and, after a restart,
# started above every generation the journal saw), so a location is never handed out twice for
# different versions of a page (the owner seals copies with it, and the journal names it).  The
# columns grow GROW_SLOTS slots at a time, into the free list, and an eviction's locations are
# taken together (`new_many`), so a new location costs a pop, not a resize of four columns.
# Which peer holds what is found by scanning the holders column: O(pages), but only on rare
# events (a peer down, restarted, leaving, or asked after our restart); the copies each peer
# holds are counted as they change, for metrics.  Copies carry no epoch of their own: a copy is
# valid in the epoch its peer is in now, because a peer's restart (a new epoch) drops every copy
# it held.  Zpage bytes waiting in the outbox and other in-flight state live in small dicts in
# the layer, not here.
from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator

from ramster.zcache.config import ALLOCATORS

SLOT_BITS = 32
SLOT_LIMIT = 1 << SLOT_BITS
SLOT_MASK = SLOT_LIMIT - 1
MAX_GEN = 0xFFFF
MAX_HOLDER_PEERS = 32
GROW_SLOTS = 256  # slots the columns grow by when none is free (~2 KiB: a page's worth each)
_WIDER = {"B": "H", "H": "I"}
_LARGEST = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF}


def slot_of(location: int) -> int:
    """What holders file the copies of `location` under."""
    return location & SLOT_MASK


def _fit(column: array[int], value: int) -> array[int]:
    """`column`, widened (a copy) until its items can hold `value`."""
    while value > _LARGEST[column.typecode]:
        column = array(_WIDER[column.typecode], column)
    return column


class TableFull(Exception):
    """More than 32 peers would hold copies at once."""


class RemoteTable:
    def __init__(self) -> None:
        # slot 0 is never used: location 0 means "refused" to zcache
        self.gen = array("H", [0])
        self.pool = array("B", [0])
        self.holders = array("B", [0])
        self.disk: array[int] | None = None
        self.disk_copies = 0
        self._free = array("I")
        self.count = 0
        # generations start above every one used before a restart (the journal's mark), so a
        # location never names two versions, not even across restarts (until 16 bits wrap)
        self.floor = 0
        self.high = 0
        self.pool_ids = [0]  # pool number -> pool id (number 0: no pool)
        self._numbers: dict[int, int] = {}  # pool id -> its number
        self._pool_pages = [0]  # pool number -> live slots with it
        self._free_numbers: list[int] = []
        self.allocators: dict[int, str] = {}  # pool id -> allocator of its zpages
        self.bits: dict[str, int] = {}  # peer address -> bit
        self.copies: dict[str, int] = {}  # peer address -> copies it holds

    # -- locations --------------------------------------------------------------------------
    def new_many(self, pool_id: int, allocator: str, count: int) -> list[int]:
        """`count` new locations in pool `pool_id`: free slots, each at its next generation
        (the columns grow GROW_SLOTS slots at a time when none is free)."""
        if len(self._free) < count:
            start = len(self.pool)
            self._grow(start + max(count - len(self._free), GROW_SLOTS))
            self._free[0:0] = array("I", range(len(self.pool) - 1, start - 1, -1))  # used last
        number = self._number(pool_id, allocator)
        free, gen, pool, floor, high = self._free, self.gen, self.pool, self.floor, self.high
        out = []
        for _ in range(count):
            slot = free.pop()
            g = gen[slot] = max(gen[slot] + 1, floor) & MAX_GEN
            pool[slot] = number
            high = max(high, g)
            out.append(g << SLOT_BITS | slot)
        self.high = high
        self._pool_pages[number] += count
        self.count += count
        return out

    def restore(self, location: int, pool_id: int, allocator: str) -> None:
        """Put back a location recovered from the journal, under its old number."""
        slot = location & SLOT_MASK
        if len(self.pool) <= slot:
            self._free.extend(range(len(self.pool), slot + 1))
            self._grow(slot + 1)
        self.gen[slot] = location >> SLOT_BITS
        number = self._number(pool_id, allocator)
        self.pool[slot] = number
        self._pool_pages[number] += 1
        self.count += 1

    def _grow(self, size: int) -> None:
        """Every column `size` slots long, the new slots unused."""
        more = size - len(self.pool)
        for column in (self.gen, self.pool, self.holders, self.disk):
            if column is not None:
                column.frombytes(bytes(more * column.itemsize))

    def _number(self, pool_id: int, allocator: str) -> int:
        """The pool's number, a new one if it has no live slot."""
        number = self._numbers.get(pool_id)
        if number is not None:
            return number
        if self._free_numbers:
            number = self._free_numbers.pop()
            self.pool_ids[number] = pool_id
        else:
            number = len(self.pool_ids)
            self.pool_ids.append(pool_id)
            self._pool_pages.append(0)
            self.pool = _fit(self.pool, number)
        self._numbers[pool_id] = number
        self.allocators[pool_id] = allocator
        return number

    def compact_free_list(self) -> None:
        """After restores: the free list holds exactly the unused slots."""
        pool = self.pool
        self._free = array("I", (s for s in range(1, len(pool)) if not pool[s]))

    def __contains__(self, location: int) -> bool:
        slot = location & SLOT_MASK
        pool, gen = self.pool, self.gen
        return slot < len(pool) and pool[slot] != 0 and gen[slot] == location >> SLOT_BITS

    def free(self, location: int, holders: list[str] | None = None) -> None:
        """Release a location; `holders`, if the caller has them already, are its holders."""
        slot = location & SLOT_MASK
        for address in self.holders_of(location) if holders is None else holders:
            self.copies[address] -= 1
        self.set_disk(location, 0)
        number = self.pool[slot]
        self.pool[slot] = self.holders[slot] = 0
        self._pool_pages[number] -= 1
        if not self._pool_pages[number]:  # the pool's number is free for another pool
            del self._numbers[self.pool_ids[number]]
            del self.allocators[self.pool_ids[number]]
            self._free_numbers.append(number)
        self._free.append(slot)
        self.count -= 1

    def pool_of(self, location: int) -> int:
        return self.pool_ids[self.pool[location & SLOT_MASK]]

    def allocator(self, location: int) -> str:
        return self.allocators.get(self.pool_of(location), ALLOCATORS[-1])

    def __iter__(self) -> Iterator[int]:
        """Every live location."""
        gen, pool = self.gen, self.pool
        return (gen[s] << SLOT_BITS | s for s in range(len(pool)) if pool[s])

    # -- disk copies ------------------------------------------------------------------------
    def disk_of(self, location: int) -> int:
        return 0 if self.disk is None else self.disk[location & SLOT_MASK]

    def set_disk(self, location: int, block: int) -> None:
        old = self.disk_of(location)
        if block == old:
            return
        if self.disk is None:  # the first disk copy: the column comes to exist
            self.disk = array("I", bytes(4 * len(self.pool)))
        self.disk[location & SLOT_MASK] = block
        self.disk_copies += (not old) - (not block)
        if not self.disk_copies:  # the last one went: so does the column
            self.disk = None

    # -- holders ----------------------------------------------------------------------------
    def _bit(self, address: str) -> int:
        """The bit of `address` in the holders column (given it now if it has none)."""
        bit = self.bits.get(address)
        if bit is None:
            used = set(self.bits.values())
            free = next((b for b in range(MAX_HOLDER_PEERS) if b not in used), None)
            if free is None:  # reuse the bit of a peer that holds nothing any more
                idle = next((a for a, n in self.copies.items() if not n), None)
                if idle is None:
                    raise TableFull(f"more than {MAX_HOLDER_PEERS} peers hold copies")
                free = self.bits.pop(idle)
                del self.copies[idle]
            bit = self.bits[address] = free
            self.copies[address] = 0
            self.holders = _fit(self.holders, 1 << bit)
        return bit

    def can_hold(self, address: str) -> bool:
        """Whether a copy can be recorded on `address` (it has a bit, or one is free)."""
        return (
            address in self.bits
            or len(self.bits) < MAX_HOLDER_PEERS
            or any(not n for n in self.copies.values())
        )

    def add_holder(self, location: int, address: str) -> None:
        self.add_holders([location], address)

    def add_holders(self, locations: list[int], address: str) -> None:
        """`address` holds a copy of each of `locations`."""
        mask, holders = 1 << self._bit(address), self.holders
        added = 0
        for location in locations:
            slot = location & SLOT_MASK
            if not holders[slot] & mask:
                holders[slot] |= mask
                added += 1
        self.copies[address] += added

    def drop_holder(self, location: int, address: str) -> bool:
        """Remove `address` from the holders of `location`; whether it was one."""
        bit = self.bits.get(address)
        slot = location & SLOT_MASK
        if bit is None or not self.holders[slot] >> bit & 1:
            return False
        self.holders[slot] &= ~(1 << bit)
        self.copies[address] -= 1
        return True

    def holds(self, location: int, address: str) -> bool:
        bit = self.bits.get(address)
        return bit is not None and bool(self.holders[location & SLOT_MASK] >> bit & 1)

    def holders_of(self, location: int) -> list[str]:
        mask = self.holders[location & SLOT_MASK]
        if not mask:
            return []
        return [a for a, bit in self.bits.items() if mask >> bit & 1]

    def held_by(self, address: str) -> list[int]:
        """Every location with a copy on `address` (a scan; for rare events)."""
        bit = self.bits.get(address)
        if bit is None or not self.copies.get(address):
            return []
        gen, holders = self.gen, self.holders
        return [gen[s] << SLOT_BITS | s for s in range(len(holders)) if holders[s] >> bit & 1]

    def without_holders(self) -> list[int]:
        gen, pool, holders = self.gen, self.pool, self.holders
        return [gen[s] << SLOT_BITS | s for s in range(len(pool)) if pool[s] and not holders[s]]

    def live_copies(self, up: int) -> Counter[int]:
        """How many pages have n copies: on the peers whose bits are set in `up`, and on disk."""
        pool, holders, disk = self.pool, self.holders, self.disk
        if disk is None:
            return Counter((m & up).bit_count() for p, m in zip(pool, holders, strict=True) if p)
        return Counter(
            (m & up).bit_count() + (d != 0)
            for p, m, d in zip(pool, holders, disk, strict=True)
            if p
        )

    def metadata_bytes(self) -> int:
        columns = (self.gen, self.pool, self.holders, self.disk, self._free)
        return sum(c.buffer_info()[1] * c.itemsize for c in columns if c is not None)
