# The engine's running counters: plain ints bumped on the data path, a batch at a time.
#
# They live on the engine's thread like every other structure; outsiders read them through
# ZCache.snapshot(), a frozen copy (snapshot.py), never here.
from __future__ import annotations

from dataclasses import dataclass, field

from ramster.zcache.config import PutResult


@dataclass
class Stats:
    puts: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    duplicate_puts: int = 0
    flushes: int = 0
    corrupt: int = 0
    unavailable: int = 0  # gets of pages whose every copy was out of reach
    evicted_hits: int = 0  # gets served by the evictor (a miss in RAM)
    promoted: int = 0  # evicted pages brought back to RAM by a get
    compacted_frames: int = 0
    outcomes: dict[PutResult, int] = field(default_factory=lambda: dict.fromkeys(PutResult, 0))
