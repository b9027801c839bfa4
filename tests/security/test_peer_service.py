# The hardened peer service: every malformed request is INVALID_ARGUMENT and changes nothing;
# invented owner ids cannot multiply quotas; refused puts leave nothing behind; a "restarted"
# put (new incarnation) does not drop another incarnation's pages.
from __future__ import annotations

from typing import Any

import grpc
import pytest

from ramster.remote import ForeignStore, OwnerTag
from ramster.remote.foreign import MAX_BLOB, MAX_SPLIT, POOL_FRAMES
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc
from ramster.zcache.codec import PAGE_SIZE
from tests.security.conftest import Pair

OWNER = pb.Owner(node_id="owner", incarnation="o" * 32)
BLOB = b"\x17" * 1000


def put_request(**changes: Any) -> pb.PutZpagesRequest:
    fields: dict[str, Any] = {
        "owner": OWNER,
        "epoch": 1,
        "pool_id": 3,
        "zpages": BLOB * 2,
        "sizes": [1000, 1000],
        "slots": [0, 1],
    }
    fields.update(changes)
    return pb.PutZpagesRequest(**fields)


BAD_PUTS = {
    "no owner": put_request(owner=pb.Owner()),
    "no incarnation": put_request(owner=pb.Owner(node_id="owner")),
    "node id too long": put_request(owner=pb.Owner(node_id="x" * 257, incarnation="i")),
    "incarnation too long": put_request(owner=pb.Owner(node_id="o", incarnation="i" * 65)),
    "pool id past 2**32": put_request(pool_id=1 << 32),
    "slot past 2**32": put_request(slots=[0, 1 << 32]),
    "sizes short of the blob": put_request(sizes=[1000, 999]),
    "sizes past the blob": put_request(sizes=[1000, 1001]),
    "a size but no slot": put_request(sizes=[1000, 500, 500]),
    "a slot but no size": put_request(slots=[0, 1, 2]),
    "the same slot twice": put_request(slots=[1, 1]),
    "an empty blob": put_request(zpages=BLOB, sizes=[1000, 0]),
    "a blob over two slots": put_request(zpages=bytes(MAX_SPLIT + 1), sizes=[MAX_SPLIT + 1],
                                         slots=[1]),
    "a batch past 4096": put_request(zpages=bytes(4097), sizes=[1] * 4097,
                                     slots=list(range(4097))),
}  # fmt: skip


def stub(pair: Pair) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(pair.address)
    return channel, peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]


async def test_malformed_requests_are_refused_with_nothing_changed(pair: Pair) -> None:
    channel, peer = stub(pair)
    async with channel:
        assert list((await peer.PutZpages(put_request())).stored) == [True, True]
        before = (pair.holder.pages, dict(pair.holder.pools), pair.holder.cache.frames)
        bad_calls = [(name, peer.PutZpages(req)) for name, req in BAD_PUTS.items()]
        bad_calls += [
            ("get: a slot past 2**32", peer.GetZpages(pb.GetZpagesRequest(
                owner=OWNER, epoch=1, pool_id=3, slots=[0, 1 << 32]))),
            ("get: too many slots", peer.GetZpages(pb.GetZpagesRequest(
                owner=OWNER, epoch=1, pool_id=3, slots=[0] * 4097))),
            ("get: no owner", peer.GetZpages(pb.GetZpagesRequest(
                epoch=1, pool_id=3, slots=[0]))),
            ("flush: lists of several lengths", peer.FlushZpages(pb.FlushZpagesRequest(
                owner=OWNER, epochs=[1], pool_ids=[3, 3], slots=[0, 1]))),
            ("flush: pool past 2**32", peer.FlushZpages(pb.FlushZpagesRequest(
                owner=OWNER, epochs=[1], pool_ids=[1 << 32], slots=[0]))),
            ("flush: a slot past 2**32", peer.FlushZpages(pb.FlushZpagesRequest(
                owner=OWNER, epochs=[1], pool_ids=[3], slots=[1 << 32]))),
            ("flush: too many slots", peer.FlushZpages(pb.FlushZpagesRequest(
                owner=OWNER, epochs=[1] * 4097, pool_ids=[3] * 4097, slots=[0] * 4097))),
            ("heartbeat: no sender", peer.Heartbeat(pb.HeartbeatRequest())),
        ]  # fmt: skip
        bad_calls += [
            (f"heartbeat: address {address[:20]!r}",
             peer.Heartbeat(pb.HeartbeatRequest(sender=OWNER, address=address)))
            for address in ("nohost", "h:0", "h:65536", "h:x", ":80", "a b:80", "h\n:80",
                            "h" * 256 + ":1")
        ]  # fmt: skip
        for name, call in bad_calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
            assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
        reclaim = peer.Reclaim(pb.ReclaimRequest(owner=pb.Owner(node_id="owner"), epoch=2))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await reclaim.read()
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (pair.holder.pages, dict(pair.holder.pools), pair.holder.cache.frames) == before
        got = await peer.GetZpages(
            pb.GetZpagesRequest(owner=OWNER, epoch=1, pool_id=3, slots=[0, 1])
        )
        assert got.zpages == BLOB * 2
        pair.holder.cache.verify()


def test_invented_owner_ids_cannot_take_more_than_the_owners_cap() -> None:
    store = ForeignStore(1000, owner_share=0.5, max_owners=2)
    fill = [b"\x01" * MAX_BLOB] * 400
    slots = list(range(400))
    taken = {name: sum(store.put(OwnerTag(name, "i"), 1, 0, slots, fill)) for name in "abcd"}
    assert taken["a"] > 0 and taken["b"] > 0
    assert taken["c"] == taken["d"] == 0  # made-up ids past the cap get nothing
    assert store.free_bytes_for("c") == 0
    assert store.owners() == {"a", "b"}
    # an owner that empties its pools frees its place
    for pool in [tag for tag in store.pools if tag[0] == "a"]:
        store.flush(OwnerTag("a", "i"), pool[2], pool[3], slots)
    assert sum(store.put(OwnerTag("c", "i"), 1, 0, slots[:1], fill[:1])) == 1
    store.cache.verify()


def test_refused_puts_leave_nothing_behind() -> None:
    store = ForeignStore(64, owner_share=0.5)
    owner = OwnerTag("o", "i")
    slots = list(range(64))
    store.put(owner, 1, 0, slots, [b"\x02" * MAX_BLOB] * 64)  # fills its share
    pools, frames = dict(store.pools), store.cache.frames
    engine_pools = len(store.cache.pools)
    for epoch in range(2, 3002):
        assert store.put(owner, epoch, 7, slots[:1], [b"x"]) == [False]
    assert (dict(store.pools), store.cache.frames, len(store.cache.pools)) == (
        pools,
        frames,
        engine_pools,
    )
    assert store.refused >= 3000


def test_each_pool_costs_its_owner_quota() -> None:
    store = ForeignStore(100, owner_share=0.5)  # a share of 50 frames
    owner = OwnerTag("o", "i")
    stored = [store.put(owner, 1, pool, [1], [b"y"])[0] for pool in range(100)]
    # each pool: its charge plus the frame its one zpage takes; tiny pools run out of quota
    assert sum(stored) == len(store.pools) == 50 // (POOL_FRAMES + 1)


def test_a_new_incarnation_does_not_drop_the_old_ones_pages() -> None:
    store = ForeignStore(100)
    old, claimed = OwnerTag("o", "first"), OwnerTag("o", "made-up")
    assert store.put(old, 1, 0, [1], [b"page"]) == [True]
    assert store.put(claimed, 1, 0, [2], [b"other"]) == [True]
    assert store.get(old, 1, 0, [1]) == [b"page"]
    # only the owner's reclaim moves them (it then flushes what it does not know)
    assert sorted(store.reclaim(OwnerTag("o", "next"), 2)) == [(0, 1), (0, 2)]
    assert store.get(OwnerTag("o", "next"), 2, 0, [1, 2]) == [b"page", b"other"]


def test_blobs_that_fit_no_two_slots_are_refused_and_long_ones_are_kept() -> None:
    store = ForeignStore(100)
    owner = OwnerTag("o", "i")
    blobs = [bytes(MAX_SPLIT + 1), b"", b"z" * PAGE_SIZE, b"w" * MAX_BLOB]
    slots = list(range(4))
    assert store.put(owner, 1, 0, slots, blobs) == [False, False, True, True]
    assert store.get(owner, 1, 0, slots) == [None, None, blobs[2], blobs[3]]
    store.cache.verify()
