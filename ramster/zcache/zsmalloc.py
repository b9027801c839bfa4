# zsmalloc: dense packing of zpages in size classes, after Linux mm/zsmalloc.c.
#
# Zpage sizes are rounded up to size classes 16 bytes apart; neighbouring classes whose layouts
# hold the same slots in the same frames are merged into the largest (as the kernel does).  A class
# carves *zspages* of one to sixteen frames into equal slots, the frame count being the one that
# wastes least of the zspage's tail, so objects cross frame boundaries (the frames of a zspage are
# not contiguous in the arena: a straddling object is written and read in two parts).
#
# Unlike the kernel, a zspage takes its frames lazily, as its lowest free slot reaches them.  Slots
# are always taken lowest first, so the frames in use are a prefix of the zspage and a class's one
# partly filled zspage wastes less than a frame, instead of up to a whole zspage.  That is what
# makes sixteen-frame zspages pay off on small pools as well as large ones (the kernel's longest
# chain): with fewer classes merged and less tail per zspage, a 1.4 KiB zpage of real memory
# wastes 12 bytes on average against 24 with eight frames (measured over the python-app corpus:
# 3 MiB less per GiB stored); the price is a coarser reclaim unit (a zspage goes as a whole).
#
# Each zspage records its used slots as a bitmap of four 64-bit words in one array (32 bytes a
# zspage, and readable by native code).  One with a free slot in the frames it owns sits
# in one of four fullness groups of its class; one whose owned frames are full but which can take
# another frame sits in a fifth, "growable" group.  Allocation takes the fullest zspage with room
# in its own frames, so sparse ones drain, and only when the class has no such room anywhere does
# it grow a zspage or start one: a put never asks the arena for a frame (and never wakes the
# reaper) while its class owns a free slot.
#
# The zspage a class allocates from is its *hot* zspage, taken out of the groups while it is hot,
# so a put costs no group bookkeeping: it stays hot until it fills, or until its owned frames
# fill while another zspage of the class has room (then the class picks again, fullest first).
# (Without this, a put of a large zpage regrouped its zspage at almost every frame it took, a
# third of the put's time.)  A free does not cool the hot zspage either, unless the hot one's
# owned frames are full, so that its next allocation would take a frame while the class now has
# room: a slot freed in the hot zspage is its lowest free one, which the next allocation takes,
# and a hole elsewhere counts in the class's waste, which stops the hot zspage from taking a
# frame, so holes are filled before any frame is taken all the same.  An overwrite (a put that
# frees the page it replaces) used to cool the hot zspage at three puts in four and pick again
# at half of them.
#
# Compaction moves zpages only into free slots in frames their zspage already owns, so it never
# takes a frame, and it plans on counts before it moves anything.  Per class, fullest first: the
# emptiest zspages whose zpages fit whole into the free owned slots of the others are emptied
# (the most that fit, as the kernel does); then the emptiest zspage kept is packed: as few of its
# top zpages as needed go to free slots of fuller ones, the rest move down into its own lowest
# free slots, and the frames above its last zpage are given back (frames are a prefix, so a
# zspage can shrink as it grows).  So a class keeps less than a frame of free owned slots in its
# last zspage, not up to a zspage's worth: at small pools, where a hundred classes each hold a
# few zspages, that is most of what separates compaction from perfect packing.  A class that
# would free no frame is left alone.  Like the kernel's zs_can_compact, a class whose wasted
# slots (free slots in owned frames) add up to a whole zspage is worth compacting; classes over
# that mark are counted in `compactable`, and `on_compactable` tells the reaper when the count
# leaves zero, so the reaper finds what to compact without looking at every pool; once it
# compacts a pool, every class that can give a frame back does, over the mark or not; a reclaim
# step stops once it has freed what it needed, after the zspage it was emptying (a whole
# fragmented pool of 700 MiB took 0.85 s in one call), and the pool waits for the next step.
#
# Zspages are the reclaimable unit: they carry the LRU position, and reclaim evicts every zpage
# of the least recent zspage to give back all its frames.  Handle = zspage id << 8 | slot.
#
# The hot paths of batches run in native code over these same tables (native/slots.rs): file()
# stores a put batch's zpages (picking, starting and regrouping zspages as alloc() does, with
# frames the arena lends and zspage ids _spare_ids() readies, as no table may grow meanwhile),
# free_many() frees the zpages a put batch replaces, and walk() reads or locates a get batch's
# zpages; each stops where a decision is this module's (releasing a zspage, a class turning
# compactable, a full arena) and the caller goes on here.  file() and free_many() pass over the
# batch's same-filled words, which are the cache's, listing where they are: stopping at each
# cost a third of a rewrite's filing (callgrind, gcc corpus, a word in 18 pages).  alloc(),
# free(), read() and locate() remain the one-page paths and the reference the native ones are
# tested against.  The tables
# grow SPARE_IDS zspages at a time (~8 KiB), so a pool holds up to that many unused entries.
#
# alloc() refuses a zpage that is empty or longer than a frame (the largest class) with
# InvalidPage before it takes a zspage: there is no class to put it in.
#
# Trade-off against zbud: near-perfect density, but reclaiming one zspage evicts many zpages.
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from typing import Any

from ramster.zcache._codec import Slots
from ramster.zcache.allocator import Extent, MoveCallback, array_bytes
from ramster.zcache.arena import Arena
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE
from ramster.zcache.errors import InvalidPage
from ramster.zcache.halves import Encodings
from ramster.zcache.lru import LruList

CLASS_STEP = 16
MIN_SIZE = 32
MAX_FRAMES = 16  # frames per zspage at most
SLOT_BITS = 8
SLOT_MASK = (1 << SLOT_BITS) - 1
GROUPS = 4  # fullness groups of zspages with room in their frames: by quarter of slots in use
GROWABLE = GROUPS  # the group of zspages whose owned frames are full but that can take more
WORDS = (SLOT_MASK + 1) // 64  # 64-bit words of a zspage's bitmap of used slots
_FULL = (1 << 64) - 1
_NO_SLOTS = array("Q", bytes(8 * WORDS))
_IN_FRAME = PAGE_SIZE - 1
SPARE_IDS = 64  # zspage ids the tables grow by at once, and lend a native filing


def class_layout(size: int) -> tuple[int, int]:
    """(frames per zspage, slots per zspage) that wastes the least for slots of `size` bytes."""
    best = (0.0, 1, PAGE_SIZE // size)
    for frames in range(1, MAX_FRAMES + 1):
        slots = min(frames * PAGE_SIZE // size, SLOT_MASK + 1)
        usage = slots * size / (frames * PAGE_SIZE)
        if usage > best[0] + 1e-9:
            best = (usage, frames, slots)
    return best[1], best[2]


def _merged_classes() -> tuple[list[int], list[int], list[int]]:
    """Class sizes, their slots per zspage, and the class of each 16-byte step."""
    steps = list(range(MIN_SIZE, PAGE_SIZE + 1, CLASS_STEP))
    sizes: list[int] = []
    layouts: list[tuple[int, int]] = []
    for size in reversed(steps):
        layout = class_layout(size)
        if not layouts or layouts[-1] != layout:
            sizes.append(size)
            layouts.append(layout)
    sizes.reverse()
    layouts.reverse()
    lookup = []
    c = 0
    for size in steps:
        while sizes[c] < size:
            c += 1
        lookup.append(c)
    return sizes, [slots for _, slots in layouts], lookup


SIZES, SLOTS, _STEP_CLASS = _merged_classes()
# The class of a zpage of each length (index 0 unused): one lookup on the alloc path.
_LENGTH_CLASS = [
    _STEP_CLASS[0 if n <= MIN_SIZE else (n - MIN_SIZE + CLASS_STEP - 1) // CLASS_STEP]
    for n in range(PAGE_SIZE + 1)
]
# Slots lying wholly in the first n frames of a zspage of each class, n = 0..MAX_FRAMES.
OWNED = [
    [min(slots, n * PAGE_SIZE // size) for n in range(MAX_FRAMES + 1)]
    for size, slots in zip(SIZES, SLOTS, strict=True)
]
_ALLOC_ORDER = (*reversed(range(GROUPS)), GROWABLE)  # room in owned frames, fullest first
# Per class and fullness group g < GROUPS: the zpage count at which a zspage leaves g upward.
_QUARTER = [[-(-(g + 1) * slots // GROUPS) for g in range(GROUPS)] for slots in SLOTS]
# The native paths over the same layout (native/slots.rs).
_SLOTS = Slots(SLOT_BITS, MAX_FRAMES, SIZES, SLOTS, OWNED, _LENGTH_CLASS, GROUPS, _QUARTER)


class Zsmalloc:
    name = "zsmalloc"

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.amap = arena.map
        self.lru = LruList()
        self.ticks = self.lru.tick  # grown in place, so this stays the same array
        self.unit_shift = SLOT_BITS  # unit id = handle >> unit_shift
        self.cls = array("H", [0])
        self.inuse = array("H", [0])
        self.nframes = array("B", [0])  # frames taken so far (a prefix of the zspage)
        self.group = array("b", [-1])  # fullness group or GROWABLE, -1 when full
        self.edge = array("H", [0])  # zpages in use at which an alloc must regroup
        self.used = array("Q", _NO_SLOTS)  # slot bitmap per zspage, WORDS words each
        self.frame = array("I", bytes(4 * MAX_FRAMES))  # MAX_FRAMES entries per zspage
        self._free_ids = array("I")
        # Fullness groups by class, made on a class's first use: an empty pool costs no dicts.
        self.groups: dict[int, list[dict[int, None]]] = {}
        self.hot = array("I", bytes(4 * len(SIZES)))  # per class: the zspage to fill, 0: pick
        # per class: free slots in the frames owned by its zspages, the hot one left out
        self.waste = array("I", bytes(4 * len(SIZES)))
        self.compactable = 0  # classes whose waste is at least one zspage of slots
        self.on_compactable: Callable[[], None] | None = None  # compactable left zero
        self.zpages = 0
        self.frames = 0

    # -- fullness groups and the hot zspage ---------------------------------------------------
    def _pick(self, c: int, tick: int) -> int:
        """Make the zspage class `c` allocates from hot, and return it: the fullest with room
        in its own frames, else a growable one, else a new one; 0 (none) if a new one would
        find no frame (a failed alloc at a full pool then costs no zspage made and dropped)."""
        groups = self.groups.get(c) or self.groups.setdefault(c, [{} for _ in range(GROUPS + 1)])
        for g in _ALLOC_ORDER:
            bucket = groups[g]
            if bucket:
                zid = next(iter(bucket))
                del bucket[zid]
                self.group[zid] = -1  # out of the groups while hot
                self._waste(c, self.inuse[zid] - OWNED[c][self.nframes[zid]])
                break
        else:
            if self.arena.in_use >= self.arena.limit:
                return 0
            zid = self._new_zspage(c, tick)
        self.edge[zid] = min(OWNED[c][self.nframes[zid]], SLOTS[c])
        self.hot[c] = zid
        return zid

    def _cool(self, c: int) -> None:
        """File class `c`'s hot zspage, if any, back in its group (its room counted in the
        class's waste again): the next alloc picks."""
        zid = self.hot[c]
        if zid:
            self.hot[c] = 0
            self._waste(c, OWNED[c][self.nframes[zid]] - self.inuse[zid])
            self._regroup(zid, self.inuse[zid])

    def _regroup(self, zid: int, inuse: int) -> None:
        """File zspage `zid` (now holding `inuse` zpages) in its fullness group, and note the
        count at which a store into it must call this again (`edge`).  The hot zspage stays
        hot, out of the groups, unless it is full or its owned frames are full while the class
        has room elsewhere."""
        c = self.cls[zid]
        slots = SLOTS[c]
        if self.hot[c] == zid:  # called from a store that filled its owned frames
            if inuse < slots and not self.waste[c]:
                self.edge[zid] = slots + 1  # grows at the next alloc, where _reach sets edge
                return
            self.hot[c] = 0  # it has no free owned slot: the class's waste stays as it is
        owned = OWNED[c][self.nframes[zid]]
        old = self.group[zid]
        if inuse >= slots:
            new, edge = -1, slots + 1  # full: only a free() changes that
        elif inuse < owned:
            new = inuse * GROUPS // slots
            edge = min(_QUARTER[c][new], owned)
        else:
            new, edge = GROWABLE, 0
        self.edge[zid] = edge
        if new != old:
            groups = self.groups[c]
            if old >= 0:
                del groups[old][zid]
            if new >= 0:
                groups[new][zid] = None
            self.group[zid] = new

    def _waste(self, c: int, delta: int) -> None:
        """Add `delta` free slots in owned frames to class `c`, tracking `compactable`."""
        old = self.waste[c]
        new = self.waste[c] = old + delta
        slots = SLOTS[c]
        if (old >= slots) is not (new >= slots):
            if new < slots:
                self.compactable -= 1
            else:
                self.compactable += 1
                if self.compactable == 1 and self.on_compactable is not None:
                    self.on_compactable()

    # -- zspages ----------------------------------------------------------------------------
    def _new_zspage(self, c: int, tick: int) -> int:
        ids: list[int] = []
        self._spare_ids(ids, 1)
        (zid,) = ids
        self.cls[zid] = c
        self.lru.push(zid, tick)
        return zid

    def _spare_ids(self, ids: list[int], n: int) -> None:
        """Append `n` unused zspage ids to `ids`, the one to use first last, in the order
        _new_zspage would take them one by one (freed ones first, else new ones, for which
        every table grows, by SPARE_IDS at least, the rest kept free): ids the native filing
        may start zspages with, as their tables cannot grow while it runs."""
        free = self._free_ids
        if len(free) < n:
            start = len(self.cls)
            grow = max(n - len(free), SPARE_IDS)
            for table, width in (
                (self.cls, 2),
                (self.inuse, 2),
                (self.nframes, 1),
                (self.edge, 2),
                (self.used, 8 * WORDS),
                (self.frame, 4 * MAX_FRAMES),
            ):
                table.frombytes(bytes(width * grow))
            self.group.frombytes(b"\xff" * grow)  # -1: in no group
            self.lru.grow(start + grow)
            # under the ids freed already, which go first as they would one by one; of the
            # new ones the lowest first
            free[0:0] = array("I", range(start + grow - 1, start - 1, -1))
        ids += free[len(free) - n :]  # taken from the end, as from the stack
        del free[len(free) - n :]

    def _release(self, zid: int) -> None:
        c = self.cls[zid]
        group = self.group[zid]
        if group >= 0:
            del self.groups[c][group][zid]
            self.group[zid] = -1
        base = zid * MAX_FRAMES
        nframes = self.nframes[zid]
        for i in range(nframes):
            self.arena.free(self.frame[base + i])
        self.frames -= nframes
        if self.hot[c] == zid:  # its room was not in the class's waste
            self.hot[c] = 0
        elif nframes:
            self._waste(c, -OWNED[c][nframes])
        self.nframes[zid] = 0
        self.used[zid * WORDS : (zid + 1) * WORDS] = _NO_SLOTS
        self.edge[zid] = 0
        self.lru.remove(zid)
        self._free_ids.append(zid)

    def _reach(self, zid: int, end: int) -> bool:
        """Give zspage `zid` frames up to byte offset `end`; False when the arena is full.  Only
        the hot zspage of a class grows, so this sets its edge and leaves the waste alone."""
        c = self.cls[zid]
        owned = OWNED[c]
        have = self.nframes[zid]
        need = (end + PAGE_SIZE - 1) >> 12
        base = zid * MAX_FRAMES
        while have < need:
            frame = self.arena.alloc()
            if frame < 0:
                return False
            self.frame[base + have] = frame
            have += 1
            self.nframes[zid] = have
            self.frames += 1
        self.edge[zid] = min(owned[have], SLOTS[c])
        return True

    def _slot_extents(self, zid: int, slot: int, size: int) -> list[Extent]:
        offset = slot * size
        index, start = offset >> 12, offset & (PAGE_SIZE - 1)
        frame = self.frame[zid * MAX_FRAMES + index]
        if start + size <= PAGE_SIZE:
            return [(frame, start, start + size)]
        nxt = self.frame[zid * MAX_FRAMES + index + 1]
        return [(frame, start, PAGE_SIZE), (nxt, 0, start + size - PAGE_SIZE)]

    # -- allocator interface ----------------------------------------------------------------
    def alloc(self, zpage: bytes, tick: int) -> int:
        length = len(zpage)
        if not 0 < length <= PAGE_SIZE:
            raise InvalidPage(f"zsmalloc stores zpages of 1 to {PAGE_SIZE} bytes, got {length}")
        c = _LENGTH_CLASS[length]
        zid = self.hot[c] or self._pick(c, tick)
        if not zid:  # no zspage of the class has room and the arena has no frame for a new one
            return -1
        self.ticks[zid] = tick
        handle = self._store(zid, c, zpage)
        if handle < 0 and not self.inuse[zid]:
            self._release(zid)
        return handle

    def _store(self, zid: int, c: int, zpage: bytes | memoryview) -> int:
        """Write `zpage` into the lowest free slot of zspage `zid` (of class `c`); -1 if no
        frame can be had.  The hot path of a put: helpers run only when a frame is taken or the
        zspage changes group, and the class's waste is the caller's (the hot zspage's room is
        not in it)."""
        size = SIZES[c]
        used, w = self.used, zid * WORDS
        while used[w] == _FULL:
            w += 1
        word = used[w]
        bit = ~word & (word + 1)  # its lowest free slot
        slot = (w - zid * WORDS) << 6 | bit.bit_length() - 1
        offset = slot * size
        if offset + size > self.nframes[zid] << 12 and not self._reach(zid, offset + size):
            return -1
        used[w] = word | bit
        inuse = self.inuse[zid] = self.inuse[zid] + 1
        if inuse >= self.edge[zid]:
            self._regroup(zid, inuse)
        self.zpages += 1
        within = offset & _IN_FRAME
        first = zid * MAX_FRAMES + (offset >> 12)
        start = self.frame[first] << 12 | within
        end = within + len(zpage)
        if end <= PAGE_SIZE:
            self.amap[start : start + end - within] = zpage
        else:  # straddles into the next frame of the zspage
            room = PAGE_SIZE - within
            self.amap[start : start + room] = zpage[:room]
            second = self.frame[first + 1] << 12
            self.amap[second : second + end - PAGE_SIZE] = zpage[room:]
        return zid << SLOT_BITS | slot

    def read(self, handle: int) -> bytes:
        zid = handle >> SLOT_BITS
        size = SIZES[self.cls[zid]]
        offset = (handle & SLOT_MASK) * size
        within = offset & _IN_FRAME
        first = zid * MAX_FRAMES + (offset >> 12)
        start = self.frame[first] << 12 | within
        if within + size <= PAGE_SIZE:
            return self.amap[start : start + size]
        room = PAGE_SIZE - within
        second = self.frame[first + 1] << 12
        return self.amap[start : start + room] + self.amap[second : second + size - room]

    def walk(
        self,
        handles: list[int],
        first: int,
        tag: int,
        mask: int,
        tick: int,
        copy: bool,
        at: list[int],
        zpages: bytearray,
        starts: list[int],
        in_place: list[int],
        offsets: list[int],
    ) -> tuple[int, int, int]:
        """read() or locate() of the zpages of a get batch, and their ticks, in one native call
        (native/slots.rs) from `first` on, up to the first handle that is neither a zpage here
        (`tag`) nor a miss; where it stopped, the last tick and the misses met."""
        return _SLOTS.walk(
            self, handles, first, tag, mask, tick, copy, at, zpages, starts, in_place, offsets
        )

    def file(
        self,
        items: Encodings,
        first: int,
        tag: int,
        tick: int,
        stored: Any,
        handles: list[int],
        results: list[Any],
        skipped: list[int],
    ) -> tuple[int, int]:
        """alloc() of a put batch's encodings from `first` on, in native calls (native/slots.rs)
        while each is a zpage: `tag` | its handle goes to `handles` and `stored` to `results`.
        A same-filled word is passed over: its position goes to `skipped`, 0 to `handles` and
        None to `results`, for the caller to file.  Between two calls this starts a class's
        new hot zspage, which the native filing leaves to _pick().  Where it stopped (at
        anything else, which the caller takes with alloc(): a raw page, a refusal, a full
        arena) and the last tick given."""
        count = len(items)
        lent: list[int] = []  # frames the arena lends the native calls, a few at a time
        spare: list[int] = []  # zspage ids they may start zspages with ...
        born: list[int] = []  # ... and those they started, for the LRU
        try:
            while True:
                if len(spare) < SPARE_IDS // 4:
                    self._spare_ids(spare, SPARE_IDS // 2)
                first, tick, filed, taken, dropped = _SLOTS.file(
                    self,
                    items,
                    first,
                    tag,
                    tick,
                    stored,
                    handles,
                    results,
                    lent,
                    spare,
                    born,
                    skipped,
                )
                self.zpages += filed
                self.frames += taken
                self.compactable -= dropped
                for zid in born:  # at the tick of its last store, which was its first use
                    self.lru.push(zid, self.ticks[zid])
                born.clear()
                if first == count or not self._picked(items[first], tick):
                    return first, tick
        finally:
            if lent:
                self.arena.give_back(lent)
            self._free_ids.extend(spare)  # the next one on top, as it was

    def _picked(self, item: bytes | None, tick: int) -> bool:
        """Whether `item`, where a native filing stopped, is a zpage whose class had no hot
        zspage and now has one (else the caller takes it)."""
        if type(item) is not bytes or not HEADER_SIZE < len(item) <= PAGE_SIZE:
            return False
        c = _LENGTH_CLASS[len(item)]
        return not self.hot[c] and self._pick(c, tick + 1) != 0  # the tick its store gets

    def locate(self, handle: int) -> int:
        zid = handle >> SLOT_BITS
        size = SIZES[self.cls[zid]]
        offset = (handle & SLOT_MASK) * size
        within = offset & _IN_FRAME
        if within + size > PAGE_SIZE:
            return -1
        return self.frame[zid * MAX_FRAMES + (offset >> 12)] << 12 | within

    def free(self, handle: int) -> None:
        zid, slot = handle >> SLOT_BITS, handle & SLOT_MASK
        self.used[zid * WORDS + (slot >> 6)] &= _FULL ^ 1 << (slot & 63)
        inuse = self.inuse[zid] - 1
        self.inuse[zid] = inuse
        self.zpages -= 1
        c = self.cls[zid]
        if self.hot[c] != zid:
            self._waste(c, 1)
        if not inuse:
            self._release(zid)
        elif self.hot[c] != zid:  # the hot one stays hot (see the header) ...
            self._regroup(zid, inuse)
            hot = self.hot[c]
            if hot and self.edge[hot] > SLOTS[c]:  # ... unless it would now take a frame
                self._cool(c)

    def free_many(
        self, handles: list[int], first: int, tag: int, mask: int, skip: int, skipped: list[int]
    ) -> int:
        """free() of the zpages of `handles` (index handles: `tag` marks this allocator's,
        whose own handle is in the bits of `mask`) from `first` on, in native calls (native/
        slots.rs) but for the frees that release a zspage, make its class compactable or cool
        its class's hot zspage, which free() takes here.  Handles of kind `skip` (a tag) are
        passed over, their positions listed in `skipped` for the caller.  Where it stopped:
        the first handle of another kind, or the end."""
        count = len(handles)
        while True:
            first, freed = _SLOTS.free(self, handles, first, tag, mask, skip, skipped)
            self.zpages -= freed
            if first == count or (handles[first] ^ tag) > mask:
                return first
            self.free(handles[first] ^ tag)
            first += 1

    def unit_handles(self, unit: int) -> list[int]:
        base, used = unit << SLOT_BITS, self.used[unit * WORDS : (unit + 1) * WORDS]
        return [
            base | w << 6 | b
            for w, bits in enumerate(used)
            for b in range(bits.bit_length())
            if bits >> b & 1
        ]

    def unit_frames(self, unit: int) -> int:
        return self.nframes[unit]

    def compact(self, on_move: MoveCallback, enough: Callable[[], bool] | None = None) -> int:
        """Compact every class in which moving zpages frees frames, a class at a time, until
        `enough()`; the frames freed."""
        before = self.frames
        for c in list(self.groups):
            self._compact_class(c, on_move, enough)
            if enough is not None and enough():
                break
        return before - self.frames

    def _compact_class(
        self, c: int, on_move: MoveCallback, enough: Callable[[], bool] | None = None
    ) -> None:
        """Empty the emptiest zspages of class `c` into the free owned slots of the fullest,
        then pack the emptiest one kept and give back its frames above its last zpage; planned
        on counts first, and nothing is moved unless a frame is freed.  Once `enough()`, it
        stops after the zspage it was emptying (the rest waits for another compaction)."""
        self._cool(c)
        inuse, nframes, owned, size = self.inuse, self.nframes, OWNED[c], SIZES[c]
        zspages = sorted(
            (zid for g in self.groups[c] for zid in g), key=inuse.__getitem__, reverse=True
        )
        if not zspages:
            return
        room = [owned[nframes[zid]] - inuse[zid] for zid in zspages]
        # m: the fewest zspages kept such that the zpages of the others fit in their room
        m, moving, space = len(zspages), 0, sum(room)
        while m > 1 and moving + inuse[zspages[m - 1]] <= space - room[m - 1]:
            m -= 1
            moving += inuse[zspages[m]]
            space -= room[m]
        last = zspages[m - 1]  # the emptiest zspage kept
        before_last = space - room[m - 1]  # room in the fuller ones kept
        count = inuse[last] + max(0, moving - before_last)  # its zpages once the others empty
        keep = -(-max(1, count - max(0, before_last - moving)) * size // PAGE_SIZE)
        freed = sum(nframes[zid] for zid in zspages[m:]) + nframes[last] - keep
        if freed <= 0:
            return
        targets = iter(zspages[:m])
        target = next(targets)

        def move(handle: int) -> None:
            nonlocal target
            while inuse[target] >= owned[nframes[target]]:  # no free slot in its frames
                target = next(targets)
            self._relocate(handle, target, c, on_move)

        for src in zspages[m:]:
            for handle in self.unit_handles(src):
                move(handle)
            if enough is not None and enough():
                return
        cut = owned[keep]  # slots wholly in the frames `last` keeps
        high = [h for h in self.unit_handles(last) if h & SLOT_MASK >= cut]
        out = max(0, inuse[last] - cut)  # the top ones go to fuller zspages, the rest down
        for handle in high[len(high) - out :]:
            move(handle)
        for handle in high[: len(high) - out]:
            self._relocate(handle, last, c, on_move)  # into its own lowest free slot
        self._trim(last, keep)

    def _relocate(self, handle: int, zid: int, c: int, on_move: MoveCallback) -> None:
        """Move a zpage into the lowest free slot of zspage `zid`, which owns that slot."""
        zpage = self.read(handle)
        new = self._store(zid, c, zpage)
        self._waste(c, -1)
        on_move(handle, new, zpage)
        self.free(handle)

    def _trim(self, zid: int, keep: int) -> None:
        """Give back the frames of zspage `zid` from the `keep`-th on, which hold no zpage."""
        c, nframes = self.cls[zid], self.nframes[zid]
        base = zid * MAX_FRAMES
        for i in range(keep, nframes):
            self.arena.free(self.frame[base + i])
        self.frames -= nframes - keep
        self.nframes[zid] = keep
        self._waste(c, OWNED[c][keep] - OWNED[c][nframes])
        self._regroup(zid, self.inuse[zid])

    def extents(self) -> Iterator[tuple[int, list[Extent]]]:
        for zid in self.lru:
            size = SIZES[self.cls[zid]]
            for handle in self.unit_handles(zid):
                yield handle, self._slot_extents(zid, handle & SLOT_MASK, size)

    def owned_frames(self) -> set[int]:
        return {
            self.frame[zid * MAX_FRAMES + i] for zid in self.lru for i in range(self.nframes[zid])
        }

    def metadata_bytes(self) -> int:
        lists = sum(len(g) for groups in self.groups.values() for g in groups) * 24
        return (
            array_bytes(
                self.cls, self.inuse, self.nframes, self.group, self.edge, self.frame, self.hot
            )
            + array_bytes(self._free_ids, self.used)
            + self.lru.metadata_bytes()
            + lists
        )
