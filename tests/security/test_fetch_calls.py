# FetchZpages, the long-lived fetch call an owner keeps to each holder: replies come in order,
# one call speaks for one owner, a bad request ends it with INVALID_ARGUMENT, a holder's drain
# ends it with UNAVAILABLE; and the owner's transport gives up on a frozen holder at its deadline
# and fetches through a new call once the holder answers again.  On a node: fetch calls count
# against --max-streams per peer address, and a graceful stop ends idle ones at once.
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from node.peering import GrpcTransport, Identity, PeerServicer
from node.sealing import Sealer
from node.server import Node
from node.settings import HostPort
from ramster.remote import ForeignStore
from ramster.remote.table import SLOT_BITS
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc
from tests.node.conftest import node_settings
from tests.security.conftest import KEY, Pair

OWNER = pb.Owner(node_id="owner", incarnation="o" * 32)
OTHER = pb.Owner(node_id="other", incarnation="x" * 32)


def fetch(slots: list[int], owner: pb.Owner = OWNER) -> pb.GetZpagesRequest:
    return pb.GetZpagesRequest(owner=owner, epoch=1, pool_id=3, slots=slots)


async def put(peer: Any, owner: pb.Owner, blobs: list[bytes]) -> None:
    request = pb.PutZpagesRequest(
        owner=owner,
        epoch=1,
        pool_id=3,
        zpages=b"".join(blobs),
        sizes=[len(b) for b in blobs],
        slots=list(range(len(blobs))),
    )
    assert all((await peer.PutZpages(request)).stored)


async def test_fetches_on_one_call_are_answered_in_order(pair: Pair) -> None:
    blobs = [bytes([i]) * (200 + i) for i in range(3)]
    async with grpc.aio.insecure_channel(pair.address) as channel:
        peer = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        await put(peer, OWNER, blobs)
        call = peer.FetchZpages()
        asked = [[2], [0, 1], [1, 7, 0]]
        for slots in asked:
            await call.write(fetch(slots))
        for slots in asked:
            reply = await call.read()
            assert reply.zpages == b"".join(blobs[s] for s in slots if s < 3)
            assert list(reply.sizes) == [len(blobs[s]) if s < 3 else 0 for s in slots]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (fetch([0], OTHER), "speaks for one owner"),
        (fetch([1 << 32]), "slots"),
        (fetch([0] * 4097), "4096"),
    ],
)
async def test_a_fetch_call_ends_at_a_bad_request(
    pair: Pair, second: pb.GetZpagesRequest, why: str
) -> None:
    async with grpc.aio.insecure_channel(pair.address) as channel:
        peer = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        await put(peer, OWNER, [b"mine" * 100])
        await put(peer, OTHER, [b"theirs" * 100])
        call = peer.FetchZpages()
        await call.write(fetch([0]))
        assert (await call.read()).zpages == b"mine" * 100
        await call.write(second)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert why in (failed.value.details() or "")
    pair.holder.cache.verify()


async def test_a_drain_ends_fetch_calls_open_and_later(pair: Pair) -> None:
    async with grpc.aio.insecure_channel(pair.address) as channel:
        peer = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        await put(peer, OWNER, [b"z" * 300])
        idle = peer.FetchZpages()
        await idle.write(fetch([0]))
        assert (await idle.read()).zpages == b"z" * 300
        pair.servicer.fetches.drain()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await idle.read()
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        late = peer.FetchZpages(iter([fetch([0])]))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await late.read()
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


class Stalling(PeerServicer):
    """A holder whose fetch replies wait for `go` (a frozen process, as its owner sees it)."""

    go = asyncio.Event()

    async def FetchZpages(  # type: ignore[override]
        self, requests: AsyncIterator[pb.GetZpagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetZpagesResponse]:
        async for reply in super().FetchZpages(requests, context):
            await self.go.wait()
            yield reply


async def test_the_transport_gives_up_on_a_frozen_holder_and_fetches_again_later() -> None:
    holder = ForeignStore(4096)
    server = grpc.aio.server()
    stalling = Stalling(holder, Identity("holder", "h" * 32))
    stalling.go = asyncio.Event()
    peer_pb2_grpc.add_PeerServicer_to_server(stalling, server)  # type: ignore[no-untyped-call]
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    transport = GrpcTransport(Identity("owner", "o" * 32), Sealer(KEY, "owner"), timeout=0.5)
    try:
        locations = [1 << SLOT_BITS | slot for slot in range(4)]  # generation 1
        zpages = [bytes([slot]) * 500 for slot in range(4)]
        blobs = [transport.seal(3, at, zpage) for at, zpage in zip(locations, zpages, strict=True)]
        assert await transport.put(address, 1, 3, blobs, locations) == [True] * 4
        frozen = [transport.get(address, 1, 3, locations[:2]) for _ in range(2)]
        for failed in await asyncio.gather(*frozen, return_exceptions=True):
            assert isinstance(failed, TimeoutError)  # the second waited behind the first
        stalling.go.set()  # the holder thaws: a new call serves, the old one's replies are dropped
        assert await transport.get(address, 1, 3, locations) == zpages
        assert await transport.get(address, 1, 3, locations[2:]) == zpages[2:]
    finally:
        await transport.close()
        await server.stop(0)
        holder.close()


@pytest.fixture
async def holder_node(tmp_path: Path) -> AsyncIterator[Node]:
    settings = node_settings(tmp_path, peers=(HostPort("127.0.0.1", 1),), max_streams=2)
    started = Node(settings)
    await started.start()
    yield started
    await started.stop(grace=1)


async def test_fetch_calls_are_limited_per_peer_address(holder_node: Node) -> None:
    async with grpc.aio.insecure_channel(holder_node.peer_target) as channel:
        peer = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        await put(peer, OWNER, [b"z" * 300])
        calls = [peer.FetchZpages() for _ in range(2)]
        for call in calls:
            await call.write(fetch([0]))
            assert (await call.read()).zpages == b"z" * 300
        third = peer.FetchZpages(iter([fetch([0])]))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await third.read()
        assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in (failed.value.details() or "")
        got = await peer.GetZpages(fetch([0]))  # unary calls go on
        assert got.zpages == b"z" * 300
        await calls[0].done_writing()
        assert await calls[0].read() is grpc.aio.EOF
        again = peer.FetchZpages()  # an ended call counts no more
        await again.write(fetch([0]))
        assert (await again.read()).zpages == b"z" * 300


async def test_a_graceful_stop_ends_idle_fetch_calls_without_waiting_its_grace(
    tmp_path: Path,
) -> None:
    node = Node(node_settings(tmp_path, peers=(HostPort("127.0.0.1", 1),)))
    await node.start()
    async with grpc.aio.insecure_channel(node.peer_target) as channel:
        peer = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        idle = peer.FetchZpages()  # (holding nothing, the node has nothing to wait for)
        await idle.write(fetch([0]))
        assert list((await idle.read()).sizes) == [0]
        started = time.monotonic()
        await node.stop(grace=30)
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await idle.read()
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
