# Every ramster.v1.Tmem RPC against an in-process node, through the client as a user calls it,
# and the raw stubs where the client would refuse to send a malformed request.
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from node.server import Node
from ramster.client import (
    AsyncClient,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    KeyRange,
    NotFound,
    Outcome,
    PageStatus,
    PageUnavailable,
    ResourceExhausted,
    Unavailable,
)
from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc
from ramster.wire import MAX_BATCH_PAGES
from ramster.zcache import CorruptPage as EngineCorrupt
from ramster.zcache import PageUnavailable as EngineUnavailable
from ramster.zcache import PutResult


def raw_stub(node: Node) -> tuple[grpc.aio.Channel, tmem_pb2_grpc.TmemStub]:
    channel = grpc.aio.insecure_channel(node.target)
    return channel, tmem_pb2_grpc.TmemStub(channel)


async def test_pools(client: AsyncClient) -> None:
    first = await client.create_pool("persistent", "zbud")
    second = await client.create_pool("ephemeral")
    pools = {p.pool: p for p in await client.list_pools()}
    assert pools[first].kind == "persistent" and pools[first].allocator == "zbud"
    assert pools[second].kind == "ephemeral" and pools[second].allocator == "zsmalloc"
    await client.put(first, 1, 0, b"\x07" * 4096)
    assert await client.destroy_pool(first) == 1
    assert [p.pool for p in await client.list_pools()] == [second]
    with pytest.raises(NotFound, match="no pool"):
        await client.destroy_pool(first)
    with pytest.raises(InvalidArgument, match="allocator"):
        await client.create_pool("persistent", "slab")


async def test_single_pages(client: AsyncClient, sample_pages: list[bytes]) -> None:
    pool = await client.create_pool()
    assert await client.put(pool, 9, 0, sample_pages[0]) is Outcome.STORED
    assert await client.put(pool, 9, 1, bytes(4096)) is Outcome.SAME_FILLED
    refused = await client.put(pool, 9, 2, sample_pages[-1])  # an xz page
    assert refused is Outcome.REFUSED_POOR_COMPRESSION and refused.reason == "poor_compression"
    assert await client.get(pool, 9, 0) == sample_pages[0]
    assert await client.get(pool, 9, 1) == bytes(4096)
    assert await client.get(pool, 9, 2) is None
    assert await client.get(pool, 9, 0, exclusive=True) == sample_pages[0]
    assert await client.get(pool, 9, 0) is None
    assert await client.flush_page(pool, 9, 1) is True
    assert await client.flush_page(pool, 9, 1) is False
    await client.put(pool, 9, 5, sample_pages[1])
    await client.put(pool, 9, 6, sample_pages[2])
    assert await client.flush_object(pool, 9) == 2
    assert await client.get(pool, 9, 5) is None


async def test_ephemeral_get_removes(client: AsyncClient, sample_pages: list[bytes]) -> None:
    pool = await client.create_pool("ephemeral")
    await client.put(pool, 1, 1, sample_pages[3])
    assert await client.get(pool, 1, 1) == sample_pages[3]
    assert await client.get(pool, 1, 1) is None


async def test_batches(client: AsyncClient, sample_pages: list[bytes]) -> None:
    pool = await client.create_pool()
    outcomes = await client.put_batch(pool, KeyRange(3, 10, 96), sample_pages)
    assert outcomes[:88].count(Outcome.REFUSED_POOR_COMPRESSION) == 0
    assert set(outcomes[88:]) == {Outcome.REFUSED_POOR_COMPRESSION}
    keys = [(3, 10 + n) for n in range(96)] + [(4, 0)]
    result = await client.get_batch(pool, keys)
    assert result.statuses == [PageStatus.HIT] * 88 + [PageStatus.MISS] * 9
    assert result.pages[:88] == sample_pages[:88] and result.pages[88:] == [None] * 9
    assert result.hits == 88
    # keys as pairs with a different object per page
    pairs = [(100 + n, n) for n in range(10)]
    assert set(await client.put_batch(pool, pairs, sample_pages[:10])) == {Outcome.STORED}
    assert (await client.get_batch(pool, pairs, exclusive=True)).pages == sample_pages[:10]
    assert (await client.get_batch(pool, pairs)).hits == 0


async def test_many_splits_into_batches(client: AsyncClient, sample_pages: list[bytes]) -> None:
    pool = await client.create_pool()
    pages = [sample_pages[n % 88] for n in range(MAX_BATCH_PAGES + 300)]
    outcomes = await client.put_many(pool, 8, 5, pages)
    assert len(outcomes) == len(pages) and not any(o.refused for o in outcomes)
    result = await client.get_many(pool, 8, 5, len(pages))
    assert result.pages == pages
    assert await client.destroy_pool(pool) == len(pages)  # flushed in chunks, then dropped


async def test_stream_pipelines_and_survives_errors(
    client: AsyncClient, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    async with client.stream() as stream:
        puts = [
            await stream.put_batch(pool, KeyRange(n, 0, 88), sample_pages[:88]) for n in range(6)
        ]
        bad = await stream.get_batch(pool + 100, KeyRange(0, 0, 1))
        gets = [await stream.get_batch(pool, KeyRange(n, 0, 88)) for n in range(6)]
        flushed = await stream.flush_object(pool, 0)
        for put in puts:
            assert set(await put) == {Outcome.STORED}
        with pytest.raises(NotFound, match="no pool"):
            await bad
        for get in gets:
            assert (await get).pages == sample_pages[:88]
        assert await flushed == 88
        assert stream.in_flight == 0


async def test_stream_reports_bad_requests(node: Node) -> None:
    channel, stub = raw_stub(node)
    async with channel:
        call = stub.Stream()
        await call.write(pb.StreamRequest(id=7))
        await call.write(pb.StreamRequest(id=8, get=pb.GetBatchRequest(pool=0, indexes=[1])))
        await call.done_writing()
        replies = [reply async for reply in call]
    assert [r.id for r in replies] == [7, 8]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "operation" in replies[0].error.message
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "object ids" in replies[1].error.message


async def test_invalid_arguments(node: Node, client: AsyncClient) -> None:
    pool = await client.create_pool()
    with pytest.raises(InvalidArgument, match="exactly 4096 bytes, got 10") as info:
        await client.put(pool, 1, 0, b"x" * 10)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="page 1 of the batch is 5 bytes"):
        await client.put_batch(pool, KeyRange(1, 0, 2), [bytes(4096), b"short"])
    channel, stub = raw_stub(node)
    async with channel:
        cases = {
            "exceeds the limit of 4096": pb.PutBatchRequest(
                pool=pool, oids=[1], indexes=range(4097), pages=bytes(4096 * 4097)
            ),
            "need 8192 bytes of pages, got 4096": pb.PutBatchRequest(
                pool=pool, oids=[1], indexes=[0, 1], pages=bytes(4096)
            ),
            "1 or 2 object ids": pb.PutBatchRequest(
                pool=pool, oids=[1, 2, 3], indexes=[0, 1], pages=bytes(8192)
            ),
        }
        for message, request in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.PutBatch(request)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetBatch(pb.GetBatchRequest(pool=pool, oids=[1], indexes=range(5000)))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_pool_is_not_found(client: AsyncClient) -> None:
    for call in (
        client.put(42, 1, 0, bytes(4096)),
        client.get(42, 1, 0),
        client.flush_page(42, 1, 0),
        client.flush_object(42, 1),
        client.put_batch(42, KeyRange(1, 0, 1), [bytes(4096)]),
        client.get_batch(42, KeyRange(1, 0, 1)),
    ):
        with pytest.raises(NotFound, match="no pool with id 42"):
            await call


async def test_no_room_is_resource_exhausted(
    node: Node, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether a full node refuses or writes back depends on its evictor; the mapping does not.
    pool = await client.create_pool()
    assert node.engine is not None
    monkeypatch.setattr(
        node.engine, "put_batch", lambda pool, keys, pages: [PutResult.REFUSED_NO_ROOM] * len(keys)
    )
    with pytest.raises(ResourceExhausted, match="pool limit"):
        await client.put(pool, 1, 0, bytes(range(256)) * 16)
    outcomes = await client.put_batch(pool, KeyRange(1, 0, 2), [bytes(4096)] * 2)
    assert outcomes == [Outcome.REFUSED_NO_ROOM] * 2 and outcomes[0].reason == "no_room"


async def test_corrupt_and_unreachable_pages_are_statuses(
    node: Node, client: AsyncClient, monkeypatch: pytest.MonkeyPatch, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    await client.put_batch(pool, KeyRange(1, 0, 3), sample_pages[:3])
    assert node.engine is not None
    real = node.engine.get_batch

    def damaged(pool_id: int, keys: list[tuple[int, int]], exclusive: bool = False) -> list:  # type: ignore[type-arg]
        out = real(pool_id, keys, exclusive)
        return [
            EngineCorrupt("bad checksum")
            if k == (1, 1)
            else EngineUnavailable("peers down")
            if k == (1, 2)
            else page
            for k, page in zip(keys, out, strict=True)
        ]

    monkeypatch.setattr(node.engine, "get_batch", damaged)
    result = await client.get_batch(pool, KeyRange(1, 0, 3))
    assert result.statuses == [PageStatus.HIT, PageStatus.CORRUPT, PageStatus.UNAVAILABLE]
    assert result.pages == [sample_pages[0], None, None] and result.corrupt == [1]
    with pytest.raises(DataLoss, match=rf"pool {pool} page \(1, 1\) is lost.*bad checksum") as info:
        await client.get(pool, 1, 1)
    assert info.value.code is grpc.StatusCode.DATA_LOSS
    with pytest.raises(PageUnavailable):
        await client.get(pool, 1, 2)


async def test_stats(client: AsyncClient, sample_pages: list[bytes]) -> None:
    pool = await client.create_pool()
    await client.put_batch(pool, KeyRange(1, 0, 96), sample_pages)
    await client.get_batch(pool, KeyRange(1, 0, 96))
    stats = await client.stats()
    assert stats.node_id == "test-node"
    assert stats.stored_pages == 88 and stats.puts == 96 and stats.gets == 96
    assert stats.hits == 88 and stats.misses == 8
    assert stats.put_outcomes["poor_compression"] == 8
    assert stats.pool_size_bytes > 0 and stats.pages_per_frame > 1
    assert stats.pool_limit_bytes == 64 * 1024 * 1024
    assert [p.pages for p in stats.pools] == [88]


async def test_deadline(node: Node, client: AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert node.engine is not None
    real = node.engine.create_pool

    def slow(*args: object, **kwargs: object) -> int:
        time.sleep(1)  # holds the loop, so the client's 50 ms deadline passes first
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node.engine, "create_pool", slow)
    with pytest.raises(DeadlineExceeded) as info:
        await client.create_pool(timeout=0.05)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_and_reflection(node: Node, client: AsyncClient) -> None:
    assert await client.health() == "SERVING"
    assert await client.health("ramster.v1.Tmem") == "SERVING"
    async with grpc.aio.insecure_channel(node.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"ramster.v1.Tmem", "grpc.health.v1.Health"} <= names


async def test_draining_refuses_new_calls_and_finishes_running_ones(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    async with client.stream() as stream:
        assert set(await (await stream.put_batch(pool, KeyRange(1, 0, 8), sample_pages[:8]))) == {
            Outcome.STORED
        }
        stopping = asyncio.create_task(node.stop(grace=30))
        for _ in range(500):
            if node.gate.draining:
                break
            await asyncio.sleep(0.01)
        assert node.gate.draining
        with pytest.raises(Unavailable):
            await client.stats()
        later = await stream.get_batch(pool, KeyRange(1, 0, 8))
        assert (await later).pages == sample_pages[:8]  # the running stream is still served
    await asyncio.wait_for(stopping, timeout=60)


async def test_stream_block_error_surfaces_and_cancels_pending(client: AsyncClient) -> None:
    pool = await client.create_pool()
    with pytest.raises(ValueError, match="caller's own"):
        async with client.stream() as stream:
            pending = await stream.put_batch(pool, KeyRange(1, 0, 1), [bytes(4096)])
            raise ValueError("the caller's own error")
    assert pending.done()
    async with client.stream() as stream:  # the client goes on working
        again = await stream.put_batch(pool, KeyRange(1, 0, 1), [bytes(4096)])
    assert await again == [Outcome.SAME_FILLED]
