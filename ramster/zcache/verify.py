# verify(): every structural invariant of an engine, checked the slow way, for tests and fuzzing.
#
# It re-derives what the engine keeps incrementally and compares: each allocator owns the frames
# it counts and no frame is owned twice; every live zpage lies inside its own frames, overlaps no
# other and is filed under the key its header names with its own handle; per pool, the index
# holds exactly the zpages in frames, the same-filled pages and the evicted ones it counts; and
# the arena's frames in use are exactly the frames the allocators own.  It walks everything, so
# it costs a full scan: never on a data path.
from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

from ramster.zcache.codec import PAGE_SIZE, zpage_key
from ramster.zcache.errors import InvariantViolation
from ramster.zcache.handles import EVICTED, KIND_SHIFT, RAW_TAG, SAME, ZPAGE_TAG

if TYPE_CHECKING:
    from ramster.zcache.cache import ZCache


def verify(cache: ZCache) -> None:
    """Raise InvariantViolation on the first broken invariant of `cache`."""
    frames: set[int] = set()
    for pool in cache.pools.values():
        for tag, alloc in ((ZPAGE_TAG, pool.zalloc), (RAW_TAG, pool.raw)):
            owned = alloc.owned_frames()
            if len(owned) != alloc.frames or owned & frames:
                raise InvariantViolation(f"{alloc.name} frame accounting is inconsistent")
            frames |= owned
            spans: dict[int, list[tuple[int, int]]] = {}
            live = 0
            for handle, extents in alloc.extents():
                live += 1
                for frame, start, end in extents:
                    if frame not in owned or not 0 <= start < end <= PAGE_SIZE:
                        raise InvariantViolation(f"zpage {handle:#x} lies outside its frames")
                    spans.setdefault(frame, []).append((start, end))
                oid, index = zpage_key(alloc.read(handle))
                if pool.index.get(oid, index) != tag | handle:
                    raise InvariantViolation(f"zpage {handle:#x} is not filed under its key")
            if live != alloc.zpages:
                raise InvariantViolation(f"{alloc.name} counts {alloc.zpages}, holds {live}")
            for frame, ranges in spans.items():
                ranges.sort()
                for (_, end), (start, _) in pairwise(ranges):
                    if start < end:
                        raise InvariantViolation(f"zpages overlap in frame {frame}")
        kinds = [h >> KIND_SHIFT for *_, h in pool.index.items()]
        if sum(kind >= EVICTED for kind in kinds) != pool.evicted:
            raise InvariantViolation(f"pool {pool.id} miscounts its evicted pages")
        if pool.index.count != pool.zalloc.zpages + pool.raw.zpages + kinds.count(SAME) + (
            pool.evicted
        ):
            raise InvariantViolation(f"pool {pool.id} index count disagrees with its zpages")
    if len(frames) != cache.arena.in_use:
        raise InvariantViolation(
            f"arena has {cache.arena.in_use} frames in use, allocators own {len(frames)}"
        )
