# Membership view: who the members are, which are up, how much room each reported, and placement
# among them.
#
# Members are known by the address of their peer API.  A node starts from *seed* addresses (the
# configured peer list; the same list on every node works) and learns the rest at runtime:
# every heartbeat says where the sender is reached, and every reply says where the replier is
# reached and lists the members it sees up (gossip), so a node started with one seed knows the
# whole cluster after two heartbeat rounds, and the cluster knows it after one.  An address that
# answers with our own incarnation is us; one that answers with our node id but another
# incarnation is a misconfigured twin; both are never used.  A seed that answers from another
# address than the one it advertises (a Service name in front of the pods, a second name of one
# node) is an *alias*: it stays a seed, heartbeated to discover members, but is never a member,
# so no node is counted, or holds a replica, twice.  A member heard at its advertised address
# supersedes any other entry with its node id: same process, that entry was an alias; another
# process, what that entry held is gone.
#
# A reply carries the peer's node id, its incarnation (random per process start), its free room
# for foreign pages and whether it is leaving.  Silence for `down_after` seconds marks a peer
# down; a reply with a new incarnation means the peer restarted and lost what it held, which the
# layer treats as down-then-up.  A restart also bumps the peer's *epoch*, which tags every page
# placed on it, so nothing placed before the restart is ever confused with what is placed after.
# A member that is down and left (it announced leaving), or has been down `forget_after`, is
# forgotten once nothing depends on it (the layer decides: no copy whose only reachable home it
# is); seeds are heartbeated for as long as they are configured, so one that comes back is
# learnt again.
#
# Placement is "the better of two random choices" by reported free room, as in load balancing:
# nearly as good as always picking the emptiest peer, without herding every node onto it.  Free
# room is debited locally as zpages are sent, so bursts between heartbeats do not overshoot.
from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum

MAX_MEMBERS = 128  # members one node keeps (and lists in a heartbeat reply)
MAX_ADDRESS = 255  # bytes of a peer address


class PeerEvent(Enum):
    UP = "up"
    DOWN = "down"
    RESTARTED = "restarted"  # came back as a new process: everything it held is gone
    LEAVING = "leaving"  # graceful stop announced: copy what it holds elsewhere
    CONFLICT = "conflict"  # another live node uses our node id: ignored
    JOINED = "joined"  # a new member address was learnt
    ALIAS = "alias"  # the address reaches a member known elsewhere: drop the entry
    GONE = "gone"  # the entry's process is gone (replaced at another address): drop it
    FORGOTTEN = "forgotten"  # left for good, or down for forget_after: no longer a member


@dataclass(frozen=True)
class PeerInfo:
    """What a heartbeat reply says."""

    node_id: str
    incarnation: str
    free_bytes: int
    leaving: bool
    address: str = ""  # where the replier's peer API is reached ("" if it does not know)
    members: tuple[str, ...] = ()  # the members it sees up


@dataclass
class Peer:
    address: str
    node_id: str = ""
    incarnation: str = ""
    up: bool = False
    leaving: bool = False
    last_heard: float = 0.0
    free_bytes: int = 0  # room for foreign pages, as reported, minus what we sent since
    epoch: int = 1
    suspect: bool = False  # a call to it failed since it last answered: try it last
    synced: bool = True  # False until it has said what it still holds for us
    asked: bool = False  # a heartbeat went to it since it was learnt
    down_since: float = 0.0  # when it was learnt or last went down (0: not yet counted)

    @property
    def placeable(self) -> bool:
        return (
            self.up
            and self.synced
            and not self.leaving
            and not self.suspect
            and self.free_bytes > 0
        )


@dataclass
class Membership:
    node_id: str
    incarnation: str
    seeds: list[str]
    down_after: float
    rng_seed: int | None = None  # placement's random choices (tests fix it)
    advertise: str = ""  # our own peer address, never a member
    forget_after: float = 60.0
    peers: dict[str, Peer] = field(init=False)
    selves: set[str] = field(init=False)  # addresses found to be us (or a twin): never members
    aliases: set[str] = field(init=False)  # seeds that reach a member known by another address

    def __post_init__(self) -> None:
        self.seeds = [a for a in dict.fromkeys(self.seeds) if a != self.advertise]
        self.peers = {a: Peer(a) for a in self.seeds}
        self.selves = {self.advertise} if self.advertise else set()
        self.aliases = set()
        self._rng = random.Random(self.rng_seed)

    # -- learning -----------------------------------------------------------------------------
    def learn(self, addresses: Iterable[str], now: float, synced: bool = False) -> list[str]:
        """Take new member addresses (gossip, a heartbeat's sender, the journal); the new ones.
        A new member is used once it has answered and, unless `synced`, said what it still
        holds for us (so no orphan of ours outlives our meeting it again)."""
        new = []
        for address in addresses:
            if (
                address in self.peers
                or address in self.selves
                or address in self.aliases
                or len(self.peers) >= MAX_MEMBERS
                or not 0 < len(address.encode()) <= MAX_ADDRESS
                or not address.isprintable()
            ):
                continue
            self.peers[address] = Peer(address, synced=synced, down_since=now)
            new.append(address)
        return new

    def discovery(self) -> list[str]:
        """Seeds that are not members: heartbeated only to learn members from them."""
        return [a for a in self.seeds if a not in self.peers and a not in self.selves]

    def drop(self, address: str) -> None:
        """Forget a member entry (the layer has let go of what it held); a seed stays a seed."""
        self.peers.pop(address, None)

    def gossip(self) -> list[str]:
        """Member addresses to tell others about: up and staying."""
        return [p.address for p in self.peers.values() if p.up and not p.leaving][:MAX_MEMBERS]

    # -- heartbeats ---------------------------------------------------------------------------
    def heard(self, address: str, info: PeerInfo, now: float) -> list[tuple[str, PeerEvent]]:
        """A heartbeat reply from member `address`; the events it implies, in order (a reply
        may also settle another entry of the same node)."""
        peer = self.peers.get(address)
        if peer is None:
            return []
        if info.address and info.address != address:
            if address in self.seeds:  # a name in front of members: discover through it
                self.aliases.add(address)
            return [(address, PeerEvent.ALIAS)]
        if info.incarnation == self.incarnation:  # our own address in the shared list
            del self.peers[address]
            self.selves.add(address)
            return []
        if info.node_id == self.node_id:
            del self.peers[address]
            self.selves.add(address)
            return [(address, PeerEvent.CONFLICT)]
        events: list[tuple[str, PeerEvent]] = []
        if info.address == address:  # the node's own address: other entries of it are stale
            for other in self.peers.values():
                if other.node_id == info.node_id and other.address != address:
                    same = other.incarnation == info.incarnation
                    events.append((other.address, PeerEvent.ALIAS if same else PeerEvent.GONE))
        if peer.incarnation and info.incarnation != peer.incarnation:
            events.append((address, PeerEvent.RESTARTED))
            peer.epoch += 1
            peer.synced = True  # a new process holds nothing from before to ask about
        elif not peer.up:
            events.append((address, PeerEvent.UP))
        if info.leaving and not peer.leaving:
            events.append((address, PeerEvent.LEAVING))
        peer.node_id, peer.incarnation = info.node_id, info.incarnation
        peer.up, peer.leaving, peer.last_heard = True, info.leaving, now
        peer.free_bytes = info.free_bytes
        peer.suspect = False
        return events

    def failed(self, address: str) -> None:
        """A call to `address` failed or timed out: until it answers a heartbeat again, copies
        elsewhere are tried first, so a frozen peer costs one timeout, not one per get."""
        peer = self.peers.get(address)
        if peer is not None:
            peer.suspect = True

    def expire(self, now: float) -> list[str]:
        """Mark peers silent for too long as down; their addresses."""
        down = []
        for peer in self.peers.values():
            if peer.up and now - peer.last_heard > self.down_after:
                peer.up = False
                peer.down_since = now
                down.append(peer.address)
        return down

    def forgettable(self, now: float) -> list[Peer]:
        """Members down after leaving, or down (or never heard) for `forget_after`.  A member
        known from before the clock ran (a seed, the journal's holders) starts counting now."""
        out = []
        for p in self.peers.values():
            if p.up:
                continue
            if not p.down_since:
                p.down_since = now
            if p.leaving or now - p.down_since > self.forget_after:
                out.append(p)
        return out

    # -- placement ----------------------------------------------------------------------------
    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.up]

    def placeable(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.placeable]

    def has_room(self) -> bool:
        """Whether some peer can take a zpage now."""
        return any(p.placeable for p in self.peers.values())

    def choose(self, exclude: set[str], among: list[Peer] | None = None) -> Peer | None:
        """A placeable peer not in `exclude` (from `among`, a `placeable()` list taken since
        nothing changed, if given): the roomier of two random candidates."""
        if among is None:
            among = self.placeable()
        candidates = [p for p in among if p.address not in exclude and p.free_bytes > 0]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.free_bytes >= b.free_bytes else b

    def choose_many(self, count: int, exclude: AbstractSet[str], among: list[Peer]) -> list[Peer]:
        """Up to `count` distinct peers as `choose` picks them one by one; when no more than
        `count` can take a copy, every one of them, with no draw (each zpage of a 3-node
        cluster's spill: a random sample per copy was ~7% of the owner's put path)."""
        candidates = [p for p in among if p.address not in exclude and p.free_bytes > 0]
        if len(candidates) <= count:
            return candidates
        chosen: list[Peer] = []
        taken = set(exclude)
        while len(chosen) < count and (peer := self.choose(taken, candidates)) is not None:
            taken.add(peer.address)
            chosen.append(peer)
        return chosen
