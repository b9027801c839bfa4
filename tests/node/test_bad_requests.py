# Requests a node must refuse, and how: keys beyond the engine's 32 bits on every ramster.v1.Tmem
# RPC (INVALID_ARGUMENT naming the field and value, or that request's Error inside Stream, never
# a truncated key), what ramster.v1.Peer does with such keys, and bytes that do not parse on every
# method of both services (INVALID_ARGUMENT, counted as such).
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from node.server import Node
from node.settings import HostPort
from ramster.client import AsyncClient
from ramster.v1 import peer_pb2, peer_pb2_grpc, tmem_pb2, tmem_pb2_grpc
from ramster.zcache.codec import compress, make_zpage
from tests.node.conftest import node_settings
from tests.node.test_metrics import fetch_metrics, value

BIG = 2**32 + 5  # cut to 32 bits this would be 5: another page, silently
PAGE = bytes(range(256)) * 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def peer_node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node that serves ramster.v1.Peer too (its one peer is an address nobody answers)."""
    started = Node(node_settings(tmp_path, peers=(HostPort("127.0.0.1", 1),)))
    await started.start()
    yield started
    await started.stop(grace=1)


def key_cases(pool: int) -> list[tuple[str, Message, str]]:
    """(method, request, what the refusal names) for each page index field of each Tmem
    request; pool ids have no range to leave (NOT_FOUND, test below)."""
    return [
        ("Put", tmem_pb2.PutRequest(pool=pool, oid=1, index=BIG, page=PAGE), f"index {BIG}"),
        ("Get", tmem_pb2.GetRequest(pool=pool, oid=1, index=BIG), f"index {BIG}"),
        ("FlushPage", tmem_pb2.FlushPageRequest(pool=pool, oid=1, index=BIG), f"index {BIG}"),
        (
            "PutBatch",
            tmem_pb2.PutBatchRequest(pool=pool, oids=[1], indexes=[6, BIG], pages=PAGE * 2),
            f"indexes holds {BIG}",
        ),
        (
            "GetBatch",
            tmem_pb2.GetBatchRequest(pool=pool, oids=[1], indexes=[5, BIG]),
            f"indexes holds {BIG}",
        ),
    ]


async def test_a_pool_id_of_another_node_or_cut_short_is_not_found(
    node: Node, client: AsyncClient
) -> None:
    pool = await client.create_pool()
    await client.put(pool, 1, 5, PAGE)
    assert pool >= 1 << 32, "public ids carry the node's salt above the engine id"
    others = [pool & 0xFFFFFFFF, pool ^ 1 << 40, pool + (1 << 32), 2**64 - 1]
    async with grpc.aio.insecure_channel(node.target) as channel:
        stub = tmem_pb2_grpc.TmemStub(channel)  # type: ignore[no-untyped-call]
        for other in others:
            for method, request in [
                ("DestroyPool", tmem_pb2.DestroyPoolRequest(pool=other)),
                ("AcceptLoss", tmem_pb2.AcceptLossRequest(pool=other)),
                ("Put", tmem_pb2.PutRequest(pool=other, oid=1, index=5, page=PAGE)),
                ("Get", tmem_pb2.GetRequest(pool=other, oid=1, index=5)),
                ("FlushObject", tmem_pb2.FlushObjectRequest(pool=other, oid=1)),
                ("GetBatch", tmem_pb2.GetBatchRequest(pool=other, oids=[1], indexes=[5])),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await getattr(stub, method)(request)
                assert err.value.code() is grpc.StatusCode.NOT_FOUND, (method, other)
                assert f"no pool with id {other}" in (err.value.details() or ""), method
    assert (await client.get(pool, 1, 5)) == PAGE
    assert [p.pool for p in await client.list_pools()] == [pool]


STREAM_OPS = {
    "PutBatch": "put",
    "GetBatch": "get",
    "FlushPage": "flush_page",
    "FlushObject": "flush_object",
}


async def test_keys_out_of_range_are_invalid_on_every_tmem_rpc(
    node: Node, client: AsyncClient
) -> None:
    pool = await client.create_pool()
    await client.put(pool, 1, 5, PAGE)  # what a key cut to 32 bits would name
    cases = key_cases(pool)
    async with grpc.aio.insecure_channel(node.target) as channel:
        stub = tmem_pb2_grpc.TmemStub(channel)  # type: ignore[no-untyped-call]
        for method, request, named in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(request)
            assert err.value.code() is INVALID, method
            assert named in (err.value.details() or ""), method
            assert "out of range [0, 2**32)" in (err.value.details() or ""), method

        streamed = [(m, r, n) for m, r, n in cases if m in STREAM_OPS]
        call = stub.Stream()
        for n, (method, request, _) in enumerate(streamed):
            await call.write(tmem_pb2.StreamRequest(id=n, **{STREAM_OPS[method]: request}))
        last = tmem_pb2.GetBatchRequest(pool=pool, oids=[1], indexes=[5])
        await call.write(tmem_pb2.StreamRequest(id=len(streamed), get=last))
        await call.done_writing()
        replies = [reply async for reply in call]
    assert [r.id for r in replies] == list(range(len(streamed) + 1))
    for reply, (method, _, named) in zip(replies, streamed, strict=False):
        assert reply.WhichOneof("result") == "error", method
        assert reply.error.code == INVALID.value[0], method
        assert named in reply.error.message, method
    assert list(replies[-1].get.statuses) == [tmem_pb2.PAGE_STATUS_HIT]  # the stream went on
    assert (await client.get(pool, 1, 5)) == PAGE  # untouched by any of the refused requests
    assert [p.pages for p in await client.list_pools()] == [1]


async def test_peer_slots_out_of_range_are_refused(peer_node: Node) -> None:
    owner = peer_pb2.Owner(node_id="owner", incarnation="one")
    zpage = make_zpage(1, 5, compress(PAGE))
    async with grpc.aio.insecure_channel(peer_node.peer_target) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        put = peer_pb2.PutZpagesRequest(
            owner=owner,
            epoch=1,
            pool_id=0,
            zpages=zpage,
            sizes=[len(zpage)],
            slots=[5],
        )
        assert list((await stub.PutZpages(put)).stored) == [True]
        refused = [
            (
                stub.GetZpages(
                    peer_pb2.GetZpagesRequest(owner=owner, epoch=1, pool_id=0, slots=[BIG])
                ),
                f"slots holds {BIG}",
            ),
            (
                stub.FlushZpages(
                    peer_pb2.FlushZpagesRequest(owner=owner, epochs=[1], pool_ids=[0], slots=[BIG])
                ),
                f"slots holds {BIG}",
            ),
            (
                stub.PutZpages(
                    peer_pb2.PutZpagesRequest(
                        owner=owner,
                        epoch=1,
                        pool_id=BIG,
                        zpages=zpage,
                        sizes=[len(zpage)],
                        slots=[5],
                    )
                ),
                f"pool_id {BIG}",
            ),
            (
                stub.GetZpages(  # refused even where no page of that owner was ever held
                    peer_pb2.GetZpagesRequest(owner=owner, epoch=9, pool_id=BIG, slots=[5])
                ),
                f"pool_id {BIG}",
            ),
        ]
        for call, message in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is INVALID
            assert message in (err.value.details() or "")
        get = peer_pb2.GetZpagesRequest(owner=owner, epoch=1, pool_id=0, slots=[5])
        assert (await stub.GetZpages(get)).zpages == zpage  # the copy in slot 5 is untouched


def all_methods() -> list[tuple[str, Any]]:
    """(path, method descriptor) of every method of ramster.v1.Tmem and ramster.v1.Peer."""
    services = [
        tmem_pb2.DESCRIPTOR.services_by_name["Tmem"],
        peer_pb2.DESCRIPTOR.services_by_name["Peer"],
    ]
    return [(f"/{s.full_name}/{m.name}", m) for s in services for m in s.methods]


GARBAGE = b"\xff\xff\xff\xff\xff\xff"  # a field tag whose varint never ends


@pytest.mark.parametrize("path,method", all_methods(), ids=[p for p, _ in all_methods()])
async def test_unparsable_requests_are_invalid_argument(
    peer_node: Node, path: str, method: Any
) -> None:
    target = peer_node.peer_target if path.startswith("/ramster.v1.Peer/") else peer_node.target
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if method.client_streaming:
                call = channel.stream_stream(path)(iter([GARBAGE]))
                _ = [reply async for reply in call]
            elif method.server_streaming:
                _ = [reply async for reply in channel.unary_stream(path)(GARBAGE)]
            else:
                await channel.unary_unary(path)(GARBAGE)
    assert err.value.code() is INVALID
    assert f"the request to {path} could not be parsed" in (err.value.details() or "")
    service, name = path.lstrip("/").split("/")
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": name}
    if method.client_streaming:
        labels["grpc_type"] = "bidi_stream"
    elif method.server_streaming:
        labels["grpc_type"] = "server_stream"
    # scraped from another thread: the node's event loop (this one) must run while it answers,
    # and the call is counted just after its status went out
    for _ in range(100):
        text = await asyncio.to_thread(fetch_metrics, peer_node)
        counted = value(text, "grpc_server_handled_total", grpc_code="InvalidArgument", **labels)
        if counted:
            break
        await asyncio.sleep(0.05)
    assert counted == 1


async def test_stream_answers_until_a_request_does_not_parse(node: Node) -> None:
    good = tmem_pb2.StreamRequest(id=1, flush_object=tmem_pb2.FlushObjectRequest(pool=0, oid=1))
    async with grpc.aio.insecure_channel(node.target) as channel:
        call = channel.stream_stream("/ramster.v1.Tmem/Stream")(
            iter([good.SerializeToString(), GARBAGE, good.SerializeToString()])
        )
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for reply in call:
                replies.append(tmem_pb2.StreamResponse.FromString(reply))
    assert [r.id for r in replies] == [1]
    assert replies[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]  # no pool 0 yet
    assert err.value.code() is INVALID
