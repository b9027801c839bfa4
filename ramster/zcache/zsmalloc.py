# zsmalloc: dense packing of zpages in size classes, after Linux mm/zsmalloc.c.
#
# Zpage sizes are rounded up to size classes 16 bytes apart; neighbouring classes whose layouts
# hold the same slots in the same frames are merged into the largest (as the kernel does).  A class
# carves *zspages* of one to eight frames into equal slots, the frame count being the one that
# wastes least of the zspage's tail, so objects cross frame boundaries (the frames of a zspage are
# not contiguous in the arena: a straddling object is written and read in two parts).
#
# Unlike the kernel, a zspage takes its frames lazily, as its lowest free slot reaches them.  Slots
# are always taken lowest first, so the frames in use are a prefix of the zspage and a class's one
# partly filled zspage wastes less than a frame, instead of up to a whole zspage.  That is what
# makes eight-frame zspages (about 1% tail waste) pay off on small pools as well as large ones.
#
# Each zspage records its used slots as a bitmap.  One with a free slot in the frames it owns sits
# in one of four fullness groups of its class; one whose owned frames are full but which can take
# another frame sits in a fifth, "growable" group.  Allocation takes the fullest zspage with room
# in its own frames, so sparse ones drain, and only when the class has no such room anywhere does
# it grow a zspage or start one: a put never asks the arena for a frame (and never wakes the
# reaper) while its class owns a free slot.
#
# Compaction moves zpages from the emptiest zspages of a class into free slots of the fullest,
# only into frames those already own, so it never takes a frame.  It plans before it moves: the
# emptiest m zspages whose zpages fit whole in the others' free owned slots are emptied, the
# largest such m, so every zpage moved helps free a zspage (a class where nothing fits is left
# alone).  Like the kernel's zs_can_compact, a class whose wasted slots (free slots in owned
# frames) add up to a whole zspage is worth compacting: then the emptiest zspage always fits, and
# afterwards the class wastes less than a zspage.  Classes over that mark are counted in
# `compactable`, and `on_compactable` tells the reaper when the count leaves zero, so the reaper
# finds what to compact without looking at every pool; once it compacts a pool, every class that
# can give a zspage back does, over the mark or not (a shifting mix of sizes leaves many classes
# just under it).
#
# Zspages are the reclaimable unit: they carry the LRU position, and reclaim evicts every zpage
# of the least recent zspage to give back all its frames.  Handle = zspage id << 8 | slot.
#
# alloc() refuses a zpage that is empty or longer than a frame (the largest class) with
# InvalidPage before it takes a zspage: there is no class to put it in.
#
# Trade-off against zbud: near-perfect density, but reclaiming one zspage evicts many zpages.
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from ramster.zcache.allocator import Extent, MoveCallback, array_bytes
from ramster.zcache.arena import Arena
from ramster.zcache.codec import PAGE_SIZE
from ramster.zcache.errors import InvalidPage
from ramster.zcache.lru import LruList

CLASS_STEP = 16
MIN_SIZE = 32
MAX_FRAMES = 8  # frames per zspage at most
SLOT_BITS = 8
SLOT_MASK = (1 << SLOT_BITS) - 1
GROUPS = 4  # fullness groups of zspages with room in their frames: by quarter of slots in use
GROWABLE = GROUPS  # the group of zspages whose owned frames are full but that can take more


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


class Zsmalloc:
    name = "zsmalloc"

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.lru = LruList()
        self.unit_shift = SLOT_BITS  # unit id = handle >> unit_shift
        self.cls = array("H", [0])
        self.inuse = array("H", [0])
        self.nframes = array("B", [0])  # frames taken so far (a prefix of the zspage)
        self.group = array("b", [-1])  # fullness group or GROWABLE, -1 when full
        self.used: list[int] = [0]  # slot bitmap per zspage
        self.frame = array("I", bytes(4 * MAX_FRAMES))  # MAX_FRAMES entries per zspage
        self._free_ids = array("I")
        # Fullness groups by class, made on a class's first use: an empty pool costs no dicts.
        self.groups: dict[int, list[dict[int, None]]] = {}
        self.waste = array("I", bytes(4 * len(SIZES)))  # free slots in owned frames, per class
        self.compactable = 0  # classes whose waste is at least one zspage of slots
        self.on_compactable: Callable[[], None] | None = None  # compactable left zero
        self.zpages = 0
        self.frames = 0

    # -- fullness groups --------------------------------------------------------------------
    def _regroup(self, zid: int, inuse: int) -> None:
        c = self.cls[zid]
        slots = SLOTS[c]
        old = self.group[zid]
        if inuse >= slots:
            new = -1
        elif inuse < OWNED[c][self.nframes[zid]]:
            new = inuse * GROUPS // slots
        else:
            new = GROWABLE
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
        if self._free_ids:
            zid = self._free_ids.pop()
            self.cls[zid] = c
        else:
            zid = len(self.cls)
            self.cls.append(c)
            self.inuse.append(0)
            self.nframes.append(0)
            self.group.append(-1)
            self.used.append(0)
            self.frame.extend(array("I", bytes(4 * MAX_FRAMES)))
            self.lru.grow(zid + 1)
        self.lru.push(zid, tick)
        return zid

    def _release(self, zid: int) -> None:
        group = self.group[zid]
        if group >= 0:
            del self.groups[self.cls[zid]][group][zid]
            self.group[zid] = -1
        base = zid * MAX_FRAMES
        nframes = self.nframes[zid]
        for i in range(nframes):
            self.arena.free(self.frame[base + i])
        self.frames -= nframes
        if nframes:
            self._waste(self.cls[zid], -OWNED[self.cls[zid]][nframes])
        self.nframes[zid] = 0
        self.used[zid] = 0
        self.lru.remove(zid)
        self._free_ids.append(zid)

    def _reach(self, zid: int, end: int) -> bool:
        """Give zspage `zid` frames up to byte offset `end`; False when the arena is full."""
        need = (end + PAGE_SIZE - 1) >> 12
        have = self.nframes[zid]
        owned = OWNED[self.cls[zid]]
        while have < need:
            frame = self.arena.alloc()
            if frame < 0:
                return False
            self.frame[zid * MAX_FRAMES + have] = frame
            have += 1
            self.nframes[zid] = have
            self.frames += 1
            self._waste(self.cls[zid], owned[have] - owned[have - 1])
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
        groups = self.groups.get(c) or self.groups.setdefault(c, [{} for _ in range(GROUPS + 1)])
        for g in _ALLOC_ORDER:
            bucket = groups[g]
            if bucket:
                zid = next(iter(bucket))
                self.lru.tick[zid] = tick
                break
        else:
            zid = self._new_zspage(c, tick)
        handle = self._store(zid, zpage)
        if handle < 0 and not self.inuse[zid]:
            self._release(zid)
        return handle

    def _store(self, zid: int, zpage: bytes | memoryview) -> int:
        """Write `zpage` into the lowest free slot of zspage `zid`; -1 if no frame can be had."""
        c = self.cls[zid]
        size = SIZES[c]
        used = self.used[zid]
        slot = (~used & (used + 1)).bit_length() - 1
        offset = slot * size
        end = offset + size
        if end > self.nframes[zid] << 12 and not self._reach(zid, end):
            return -1
        self.used[zid] = used | (1 << slot)
        inuse = self.inuse[zid] + 1
        self.inuse[zid] = inuse
        self._regroup(zid, inuse)
        waste = self.waste[c]  # _waste(c, -1), inlined on the hot path
        self.waste[c] = waste - 1
        if waste == SLOTS[c]:
            self.compactable -= 1
        length = len(zpage)
        first = zid * MAX_FRAMES + (offset >> 12)
        within = offset & (PAGE_SIZE - 1)
        start = (self.frame[first] << 12) + within
        amap = self.arena.map
        if within + length <= PAGE_SIZE:
            amap[start : start + length] = zpage
        else:
            room = PAGE_SIZE - within
            amap[start : start + room] = zpage[:room]
            second = self.frame[first + 1] << 12
            amap[second : second + length - room] = zpage[room:]
        self.zpages += 1
        return zid << SLOT_BITS | slot

    def read(self, handle: int) -> bytes:
        zid = handle >> SLOT_BITS
        size = SIZES[self.cls[zid]]
        offset = (handle & SLOT_MASK) * size
        first = zid * MAX_FRAMES + (offset >> 12)
        start = (self.frame[first] << 12) + (offset & (PAGE_SIZE - 1))
        room = PAGE_SIZE - (offset & (PAGE_SIZE - 1))
        amap = self.arena.map
        if size <= room:
            return amap[start : start + size]
        second = self.frame[first + 1] << 12
        return amap[start : start + room] + amap[second : second + size - room]

    def free(self, handle: int) -> None:
        zid, slot = handle >> SLOT_BITS, handle & SLOT_MASK
        self.used[zid] &= ~(1 << slot)
        inuse = self.inuse[zid] - 1
        self.inuse[zid] = inuse
        self.zpages -= 1
        self._waste(self.cls[zid], 1)
        if inuse:
            self._regroup(zid, inuse)
        else:
            self._release(zid)

    def unit_handles(self, unit: int) -> list[int]:
        used = self.used[unit]
        return [unit << SLOT_BITS | s for s in range(used.bit_length()) if used >> s & 1]

    def unit_frames(self, unit: int) -> int:
        return self.nframes[unit]

    def compact(self, on_move: MoveCallback) -> int:
        """Compact every class in which moving zpages frees zspages; the frames freed."""
        before = self.frames
        for c in list(self.groups):
            self._compact_class(c, on_move)
        return before - self.frames

    def _compact_class(self, c: int, on_move: MoveCallback) -> None:
        """Empty the emptiest zspages of a class into free slots the fullest own, as many as fit
        whole: the first m (by zpages in use) such that their zpages fit in the free owned slots
        of the others.  That m is found before anything moves, so every zpage moved helps free
        a zspage, and none is moved for nothing."""
        inuse, nframes, owned = self.inuse, self.nframes, OWNED[c]
        partial = sorted((zid for g in self.groups[c] for zid in g), key=inuse.__getitem__)
        room = sum(owned[nframes[zid]] - inuse[zid] for zid in partial)
        moving = m = 0
        for zid in partial:  # room: the free owned slots of partial[m:]
            free = owned[nframes[zid]] - inuse[zid]
            if moving + inuse[zid] > room - free:
                break
            moving += inuse[zid]
            room -= free
            m += 1
        targets = partial[: m - 1 : -1] if m else []  # fullest first
        t = 0
        for src in partial[:m]:
            for handle in self.unit_handles(src):
                while not 0 <= self.group[targets[t]] < GROUPS:  # no free slot in its frames
                    t += 1
                zpage = self.read(handle)
                new = self._store(targets[t], zpage)  # into a frame the target owns
                on_move(handle, new, zpage)
                self.free(handle)

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
        bitmaps = sum(b.__sizeof__() for b in self.used) + self.used.__sizeof__()
        lists = sum(len(g) for groups in self.groups.values() for g in groups) * 24
        return (
            array_bytes(self.cls, self.inuse, self.nframes, self.group, self.frame, self._free_ids)
            + self.lru.metadata_bytes()
            + bitmaps
            + lists
        )
