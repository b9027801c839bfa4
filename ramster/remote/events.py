# The ramster layer's one interface, in the sans-IO style of h11: the node feeds the layer
# *events* (what happened on the network or the clock) with `RamsterLayer.handle()` and takes
# *actions* (calls to make) from `RamsterLayer.actions()`, `probes()` and `fetch_for()`; the layer
# never performs I/O and never waits, so the same policy runs under asyncio with gRPC
# (node/driver.py) and step by step in the in-memory tests.
#
# An action is answered by the event that names it (a Send by Sent or Refused, a Flush by
# Flushed, a Fetch by Fetched, a Reclaim by Reclaimed), so the layer matches replies to what it
# asked without the caller rebuilding tuples.  Everything is immutable: an action handed out
# is a record of what was asked, not a handle into the layer's tables.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ramster.remote.membership import PeerInfo


class Placed(NamedTuple):
    """A zpage to place: the layer's location for it (its version), its pool, its bytes."""

    location: int
    pool_id: int
    zpage: bytes


class FlushItem(NamedTuple):
    """A copy a holder must drop: the epoch it was placed in, its pool and its slot."""

    epoch: int
    pool_id: int
    slot: int


class FetchSource(NamedTuple):
    """Where a remote copy can be fetched: the peer and the epoch it was placed in."""

    address: str
    epoch: int


class Wanted(NamedTuple):
    """A location whose bytes are wanted, its pool, and the holders to ask, best first."""

    location: int
    pool_id: int
    sources: tuple[FetchSource, ...]


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    """Put zpages on one peer (answer: Sent, or Refused if the call failed)."""

    address: str
    epoch: int
    items: tuple[Placed, ...]


@dataclass(frozen=True)
class Flush:
    """Drop copies on one peer (answer: Flushed).  A peer's flushes go before its sends."""

    address: str
    items: tuple[FlushItem, ...]


@dataclass(frozen=True)
class Fetch:
    """Bring copies back (answer: Fetched): for a get about to load them, or to re-place them
    (`repair`) after a holder went."""

    wanted: tuple[Wanted, ...]
    repair: bool


@dataclass(frozen=True)
class Reclaim:
    """Ask a peer what it still holds for us (answer: Reclaimed), before it is used."""

    address: str
    epoch: int


@dataclass(frozen=True)
class Probe:
    """Heartbeat an address (answer: Heard or Silent); `verify`: it must prove it is the node
    it claims (a member), else any node of the cluster may answer (a seed, for discovery)."""

    address: str
    verify: bool


Action = Send | Flush | Fetch | Reclaim | Probe


# -- events -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heard:
    """A heartbeat reply from `address`."""

    address: str
    info: PeerInfo
    now: float


@dataclass(frozen=True)
class Silent:
    """A call to `address` failed or timed out (a heartbeat, or any other)."""

    address: str


@dataclass(frozen=True)
class Tick:
    """Time passed: silent peers go down, members gone for good are forgotten."""

    now: float


@dataclass(frozen=True)
class Joined:
    """Member addresses heard of outside a reply (a heartbeat's sender)."""

    addresses: tuple[str, ...]
    now: float


@dataclass(frozen=True)
class Sent:
    """What the peer did with each zpage of `send`."""

    send: Send
    stored: tuple[bool, ...]


@dataclass(frozen=True)
class Refused:
    """The call carrying `send` failed: nothing of it was stored."""

    send: Send


@dataclass(frozen=True)
class Flushed:
    flush: Flush
    ok: bool


@dataclass(frozen=True)
class Fetched:
    """The intact copies found for `fetch` (by location), and the (location, holder) pairs
    whose copy failed verification."""

    fetch: Fetch
    copies: dict[int, bytes]
    damaged: tuple[tuple[int, str], ...] = field(default=())


@dataclass(frozen=True)
class Reclaimed:
    """What `address` still holds for us: (pool id, slot) of each copy."""

    address: str
    copies: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class Leaving:
    """This node is stopping: take no new zpages (the backing file takes them)."""


Event = Heard | Silent | Tick | Joined | Sent | Refused | Flushed | Fetched | Reclaimed | Leaving
