# Membership view: which peers are up, how much room each reported, and placement among them.
#
# Every node heartbeats every configured peer address (the same list on every node works: an
# address that answers with our own incarnation is us, and is dropped; one that answers with our
# node id but another incarnation is a misconfigured twin, and is never used).  A reply carries
# the peer's node id, its incarnation (random per process start), its free room for foreign pages
# and whether it is leaving.  Silence for `down_after` seconds marks a peer down; a reply with a
# new incarnation means the peer restarted and lost what it held, which the layer treats as
# down-then-up.  A restart also bumps the peer's *epoch*, which tags every page placed on it, so
# nothing placed before the restart is ever confused with what is placed after.
#
# Placement is "the better of two random choices" by reported free room, as in load balancing:
# nearly as good as always picking the emptiest peer, without herding every node onto it.  Free
# room is debited locally as zpages are sent, so bursts between heartbeats do not overshoot.
from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


class PeerEvent(Enum):
    UP = "up"
    DOWN = "down"
    RESTARTED = "restarted"  # came back as a new process: everything it held is gone
    LEAVING = "leaving"  # graceful stop announced: copy what it holds elsewhere
    CONFLICT = "conflict"  # another live node uses our node id: ignored


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
    synced: bool = True  # False until an owner back from a restart has asked what it holds

    @property
    def placeable(self) -> bool:
        return (
            self.up
            and self.synced
            and not self.leaving
            and not self.suspect
            and self.free_bytes > 0
        )


class Membership:
    def __init__(
        self,
        node_id: str,
        incarnation: str,
        addresses: list[str],
        down_after: float,
        seed: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.down_after = down_after
        self.peers: dict[str, Peer] = {a: Peer(a) for a in dict.fromkeys(addresses)}
        self._rng = random.Random(seed)

    def heard(
        self,
        address: str,
        node_id: str,
        incarnation: str,
        free_bytes: int,
        leaving: bool,
        now: float,
    ) -> list[PeerEvent]:
        """A heartbeat reply from `address`; the events it implies, in order."""
        peer = self.peers.get(address)
        if peer is None:
            return []
        if incarnation == self.incarnation:  # our own address in the shared list
            del self.peers[address]
            return []
        if node_id == self.node_id:
            del self.peers[address]
            return [PeerEvent.CONFLICT]
        events = []
        if peer.incarnation and incarnation != peer.incarnation:
            events.append(PeerEvent.RESTARTED)
            peer.epoch += 1
            peer.synced = True  # a new process holds nothing from before to ask about
        elif not peer.up:
            events.append(PeerEvent.UP)
        if leaving and not peer.leaving:
            events.append(PeerEvent.LEAVING)
        peer.node_id, peer.incarnation = node_id, incarnation
        peer.up, peer.leaving, peer.last_heard = True, leaving, now
        peer.free_bytes = free_bytes
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
                down.append(peer.address)
        return down

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.up]

    def placeable(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.placeable]

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
