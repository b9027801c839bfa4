# Evictors: where persistent zpages go when the reaper frees their frames (the "backdoor exit").
#
# zcache knows nothing of disks or peers.  It hands an evictor a pool id and a list of zpages
# (still compressed; each zpage's header names its key and carries its checksum) and gets back,
# per zpage, a *location*: a positive integer below 2**56 that only that evictor interprets, or 0
# for "refused".  It files `location` in its index and later asks the evictor to `load` the zpage
# (zcache verifies the checksum itself, so an evictor can never return wrong bytes unnoticed) or
# to `forget` it.  `recovered()` lets a durable evictor re-announce what it held before a restart.
#
# EvictorChain tries its links in order (the ramster layer first, the backing file last): what one
# refuses the next is offered.  It stores the link number in the top bits of the location.
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

LOCATION_BITS = 56
LINK_SHIFT = 52
LINK_MASK = (1 << LINK_SHIFT) - 1


class Evictor(Protocol):
    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        """Take zpages of one pool; per zpage its location (> 0), or 0 if refused."""
        ...

    def load(self, pool_id: int, location: int) -> bytes:
        """The zpage at `location`; may raise CorruptPage or return bytes that fail verification."""
        ...

    def forget(self, pool_id: int, locations: list[int]) -> None:
        """Drop the zpages at `locations` (flushed, overwritten or promoted back to memory); a
        durable evictor has recorded it when this returns, in one step for them all."""
        ...

    def recovered(self) -> Iterator[tuple[int, str, int, int, int]]:
        """(pool id, allocator, oid, index, location) of zpages held from before a restart."""
        ...


class EvictorChain:
    """Offer zpages to each link in turn; a location remembers which link took it."""

    def __init__(self, links: Sequence[Evictor]) -> None:
        if not 1 <= len(links) <= 1 << (LOCATION_BITS - LINK_SHIFT):
            raise ValueError(f"an evictor chain holds 1 to 16 links, got {len(links)}")
        self.links = list(links)

    def evict(self, pool_id: int, allocator: str, zpages: list[bytes]) -> list[int]:
        out = [0] * len(zpages)
        pending = list(range(len(zpages)))
        for link_no, link in enumerate(self.links):
            if not pending:
                break
            taken = link.evict(pool_id, allocator, [zpages[i] for i in pending])
            left = []
            for i, location in zip(pending, taken, strict=True):
                if location:
                    out[i] = link_no << LINK_SHIFT | location
                else:
                    left.append(i)
            pending = left
        return out

    def held_by(self, link: Evictor, locations: list[int]) -> list[int]:
        """Each of `locations` (the chain's; 0: none) as `link` knows it, 0 where another link
        holds it: so the layer that must fetch its pages before a get finds its own."""
        number = self.links.index(link)
        return [loc & LINK_MASK if loc and loc >> LINK_SHIFT == number else 0 for loc in locations]

    def load(self, pool_id: int, location: int) -> bytes:
        return self.links[location >> LINK_SHIFT].load(pool_id, location & LINK_MASK)

    def forget(self, pool_id: int, locations: list[int]) -> None:
        by_link: dict[int, list[int]] = {}
        for location in locations:
            by_link.setdefault(location >> LINK_SHIFT, []).append(location & LINK_MASK)
        for link_no, own in by_link.items():
            self.links[link_no].forget(pool_id, own)

    def recovered(self) -> Iterator[tuple[int, str, int, int, int]]:
        for link_no, link in enumerate(self.links):
            for pool_id, allocator, oid, index, location in link.recovered():
                yield pool_id, allocator, oid, index, link_no << LINK_SHIFT | location
