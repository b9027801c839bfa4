# Membership at runtime: nodes that join from one seed, gossip that teaches every member, a
# node that leaves for good and is forgotten once drained, aliases and replaced processes, and
# a down member that is kept while a page's last copy is on it.  The first part drives
# Membership alone; the rest runs the real layer, zcache and driver on the in-memory network.
from __future__ import annotations

from pathlib import Path

from ramster.remote import Membership, PeerEvent
from ramster.remote.membership import MAX_MEMBERS, PeerInfo
from tests.remote.memnet import MemNetwork
from tests.remote.test_layer import expected, read_all, spill


def info(node: str, incarnation: str = "i1", address: str = "", *members: str) -> PeerInfo:
    return PeerInfo(node, incarnation, 1 << 20, False, address, members)


def test_a_seed_that_advertises_another_address_is_only_for_discovery() -> None:
    m = Membership("a", "me", ["svc:1"], down_after=3.0)
    events = m.heard("svc:1", info("b", "i1", "b:1", "c:1"), now=1.0)
    assert events == [("svc:1", PeerEvent.ALIAS)]
    assert m.discovery() == []  # still a member entry until the layer drops it
    m.drop("svc:1")
    assert m.discovery() == ["svc:1"]
    assert m.learn(["b:1", "c:1", "svc:1"], now=1.0) == ["b:1", "c:1"]  # an alias is not learnt


def test_a_member_heard_at_its_own_address_supersedes_its_other_entries() -> None:
    m = Membership("a", "me", ["old:1", "b:1"], down_after=3.0)
    m.heard("old:1", info("b", "i1"), now=1.0)  # a node that does not advertise (older)
    events = m.heard("b:1", info("b", "i2", "b:1"), now=2.0)
    assert ("old:1", PeerEvent.GONE) in events  # another process now: what old:1 held is gone
    m = Membership("a", "me", ["old:1", "b:1"], down_after=3.0)
    m.heard("old:1", info("b", "i1"), now=1.0)
    assert ("old:1", PeerEvent.ALIAS) in m.heard("b:1", info("b", "i1", "b:1"), now=2.0)


def test_ourselves_and_bad_addresses_are_never_learnt() -> None:
    m = Membership("a", "me", ["a:1", "b:1"], down_after=3.0, advertise="a:1")
    assert list(m.peers) == ["b:1"]
    assert m.learn(["a:1", "", "x" * 300, "bad\naddress", "c:1"], now=0.0) == ["c:1"]
    m.heard("b:1", info("b"), now=1.0)
    m.learn([f"n{i}:1" for i in range(2 * MAX_MEMBERS)], now=1.0)
    assert len(m.peers) == MAX_MEMBERS  # a flood of gossip is bounded


def test_down_members_are_forgettable_at_once_after_leaving_else_after_forget_after() -> None:
    m = Membership("a", "me", ["b:1", "c:1"], down_after=3.0, forget_after=60.0)
    m.heard("b:1", PeerInfo("b", "i1", 1, True), now=1.0)  # b announces it is leaving
    m.heard("c:1", info("c"), now=1.0)
    m.expire(now=10.0)
    assert [p.address for p in m.forgettable(now=10.0)] == ["b:1"]
    assert [p.address for p in m.forgettable(now=71.0)] == ["b:1", "c:1"]
    m = Membership("a", "me", ["b:1"], down_after=3.0, forget_after=60.0)
    assert m.forgettable(now=1000.0) == []  # a seed never heard: its time starts now
    assert [p.address for p in m.forgettable(now=1061.0)] == ["b:1"]


def test_choose_many_takes_every_candidate_without_a_draw_else_distinct_roomier_ones() -> None:
    m = Membership("a", "me", ["b:1", "c:1", "d:1", "e:1"], down_after=3.0)
    for n, address in enumerate(["b:1", "c:1", "d:1", "e:1"]):
        m.heard(address, PeerInfo(address[0], "i1", (n + 1) << 20, False), now=1.0)
    among = m.placeable()
    state = m._rng.getstate()
    two = m.choose_many(2, {"b:1", "c:1"}, among)  # only two can take it: both, no draw
    assert [p.address for p in two] == ["d:1", "e:1"] and m._rng.getstate() == state
    m.peers["e:1"].free_bytes = 0  # full: never a candidate
    assert [p.address for p in m.choose_many(3, set(), among)] == ["b:1", "c:1", "d:1"]
    m.peers["e:1"].free_bytes = 8 << 20
    for _ in range(50):  # a choice: distinct peers, never the excluded, never the least roomy
        picked = [p.address for p in m.choose_many(2, {"c:1"}, among)]
        assert len(set(picked)) == 2 and "c:1" not in picked
        assert picked[0] != "b:1"  # the roomier of any two candidates is never b, the smallest


async def test_a_node_joins_from_one_seed_and_every_member_learns_it(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"], limit_frames=30)
    await net.settle(2)
    net.join("d", ["c"])  # knows only c
    await net.settle(3)
    for name, node in net.nodes.items():
        others = {n for n in net.nodes if n != name}
        peers = node.layer.membership.peers
        assert set(peers) == others, f"{name} sees {set(peers)}"
        assert all(p.up and p.synced for p in peers.values())
    a, pool, keys = await spill(net, compressible_pages)  # placement uses the newcomer
    assert net.nodes["d"].foreign.pages_by_owner().get("a", 0) > 0
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_a_node_that_leaves_for_good_is_drained_then_forgotten(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c", "d"], limit_frames=30)
    a, pool, keys = await spill(net, compressible_pages)
    d = net.nodes["d"]
    assert a.layer.table.copies.get("d")
    d.leaving = True
    for _ in range(20):
        await net.settle(1)
        if not d.foreign.pages_by_owner().get("a"):
            break
    assert not a.layer.table.copies.get("d"), "d was not drained"
    d.up = False  # the process ends
    await net.settle(5)
    for name in "abc":
        assert "d" not in net.nodes[name].layer.membership.peers, f"{name} still knows d"
    assert a.layer.stats.lost == 0
    hist = a.layer.replica_histogram()
    assert min(hist) >= 2, hist
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_a_down_member_holding_a_last_copy_is_kept(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """Forgetting drops copies: not while one is the only copy a page has left."""
    from ramster.remote import RemoteConfig

    config = RemoteConfig(heartbeat_interval=1.0, down_after=3.0, forget_after=4.0, replicas=1)
    net = MemNetwork(tmp_path, ["a", "b"], limit_frames=30, config=config)
    a, pool, keys = await spill(net, compressible_pages)
    held = len(a.layer.table.held_by("b"))
    assert held
    net.cut.add(frozenset(("a", "b")))  # b is alive, a cannot reach it
    await net.settle(12)
    assert "b" in a.layer.membership.peers  # down well past forget_after, but needed
    net.cut.clear()
    await net.settle(2)
    assert len(a.layer.table.held_by("b")) == held
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
