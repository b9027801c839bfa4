# Engine settings and the enums of the tmem interface (a put's outcome is ramster.wire's).
#
# Defaults follow zcache/zswap practice: a page is refused when LZ4 cannot shrink it to 7/8 of a
# page (storing it would cost nearly a frame for little gain), the pageframe budget (the pool
# limit) is a quarter of physical memory, and reclaim that starts at the limit goes on down to
# 90% of it (zswap's accept threshold) so a full pool is not reclaimed one frame per put.
# Everything is validated here, once, so the hot paths trust it.
from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from ramster.wire import Outcome
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE
from ramster.zcache.errors import InvalidConfig

PutResult = Outcome  # what a put did: the wire's outcome (ramster.wire), so no table maps them

ALLOCATORS = ("zbud", "zsmalloc")


def default_pool_limit_frames() -> int:
    """A quarter of physical memory, in frames."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // PAGE_SIZE
    except (ValueError, OSError):
        pages = 1 << 20
    return max(1, pages // 4)


class PoolKind(enum.Enum):
    PERSISTENT = "persistent"  # frontswap-like: kept until flushed
    EPHEMERAL = "ephemeral"  # cleancache-like: may vanish; a get removes it


@dataclass(frozen=True)
class ZCacheConfig:
    pool_limit_frames: int = 0  # the pool limit in frames; 0: default_pool_limit_frames()
    compress_threshold: int = PAGE_SIZE * 7 // 8
    store_incompressible_raw: bool = False
    default_allocator: str = "zsmalloc"
    reclaim_to: float = 0.9  # reclaim goes down to this share of the limit
    promote_on_get: bool = True  # a second get of an evicted persistent page brings it home
    compact_before_evict: bool = True  # off only to measure what compaction saves

    def __post_init__(self) -> None:
        if self.pool_limit_frames == 0:
            object.__setattr__(self, "pool_limit_frames", default_pool_limit_frames())
        if self.pool_limit_frames < 1:
            raise InvalidConfig(f"pool_limit_frames must be positive, got {self.pool_limit_frames}")
        top = PAGE_SIZE - HEADER_SIZE
        if not 1 <= self.compress_threshold <= top:
            raise InvalidConfig(
                f"compress_threshold must be between 1 and {top} bytes, "
                f"got {self.compress_threshold}"
            )
        if not 0.0 <= self.reclaim_to < 1.0:
            raise InvalidConfig(f"reclaim_to must be in [0, 1), got {self.reclaim_to}")
        if self.default_allocator not in ALLOCATORS:
            raise InvalidConfig(
                f"unknown allocator {self.default_allocator!r}; choose one of {ALLOCATORS}"
            )
