# One tmem pool of the engine: its kind, its policy, its allocators and its index.
#
# A pool stores zpages in its own allocator (zbud or zsmalloc) and incompressible pages stored
# raw in frames of their own (RawFrames); both draw frames from the engine's one arena, so the
# pool limit covers every pool together.  Its index maps a key to a tagged handle that says which
# of the two holds the zpage, or that the page is same-filled or with the evictor (handles.py),
# and it counts the evicted ones, so the engine's totals never walk an index.
from __future__ import annotations

from ramster.zcache.allocator import Allocator
from ramster.zcache.config import PoolKind
from ramster.zcache.handles import KIND_SHIFT, RAW_TAG, ZPAGE, ZPAGE_TAG
from ramster.zcache.index import PageIndex
from ramster.zcache.rawframes import RawFrames

# A pool to recreate at start: (pool id, kind, allocator, store_raw or None for the default).
PoolSpec = tuple[int, PoolKind, str, bool | None]


class Pool:
    def __init__(
        self, pool_id: int, kind: PoolKind, allocator: Allocator, raw: RawFrames, store_raw: bool
    ) -> None:
        self.id = pool_id
        self.kind = kind
        self.ephemeral = kind is PoolKind.EPHEMERAL
        self.store_raw = store_raw  # incompressible pages are stored raw, not refused
        self.zeros_absent = False  # a missing page means zeros: zero pages are not kept
        self.allocator = allocator.name
        self.zalloc = allocator
        self.raw = raw
        self.index = PageIndex()
        self.evicted = 0  # pages of this pool held by the evictor

    def allocator_of(self, handle: int) -> Allocator:
        return self.zalloc if handle >> KIND_SHIFT == ZPAGE else self.raw

    def tag_of(self, alloc: Allocator) -> int:
        return ZPAGE_TAG if alloc is self.zalloc else RAW_TAG

    @property
    def frames(self) -> int:
        return self.zalloc.frames + self.raw.frames

    @property
    def zpages(self) -> int:
        return self.zalloc.zpages + self.raw.zpages
