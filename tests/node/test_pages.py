# The Pages RPC, the stream AsyncClient sends its single-page calls on: one page per request,
# calls from many tasks on one stream, per-call deadlines, and the stream's end when the node
# drains (it must not hold the drain, and later calls are refused as unary ones are).
from __future__ import annotations

import asyncio

import grpc
import pytest

from node.server import Node
from node.servicer import TmemServicer
from ramster.bulkwire import Parts, read_stream_reply
from ramster.client import (
    AsyncClient,
    DeadlineExceeded,
    InvalidArgument,
    KeyRange,
    Outcome,
    Unavailable,
)
from ramster.client.aio import GET, PUT, Stream
from ramster.client.messages import get_batch_requests, put_batch_requests
from ramster.v1 import tmem_pb2 as pb
from ramster.zcache import PageError

BOUND = 30.0  # a bound on waits that end at once when the code is right
PAGES = "/ramster.v1.Tmem/Pages"


async def test_page_calls_from_many_tasks_share_one_stream(
    client: AsyncClient, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    count = 64
    outcomes = await asyncio.gather(
        *(client.put(pool, 3, i, sample_pages[i % 88]) for i in range(count))
    )
    assert set(outcomes) == {Outcome.STORED}
    pages = await asyncio.gather(*(client.get(pool, 3, i) for i in range(count)))
    assert pages == [sample_pages[i % 88] for i in range(count)]
    assert await client.flush_page(pool, 3, 0) and not await client.flush_page(pool, 3, 0)
    assert await client.flush_object(pool, 3) == count - 1
    assert await client.get(pool, 3, 1) is None


async def test_a_batch_on_pages_is_refused_and_the_stream_goes_on(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    async with grpc.aio.insecure_channel(node.target) as channel:
        call = channel.stream_stream(
            PAGES, request_serializer=b"".join, response_deserializer=read_stream_reply
        )
        async with Stream(call, BOUND) as pages:
            (two,) = put_batch_requests(pool, KeyRange(1, 0, 2), sample_pages[:2])
            refused = await pages.send(PUT, two, lambda reply, _: reply)
            (one,) = get_batch_requests(pool, KeyRange(1, 0, 1), False)
            got = await pages.send(GET, Parts.of(one.SerializeToString()), lambda r, _: r)
            with pytest.raises(InvalidArgument, match="carries one page"):
                await refused
            assert list((await got).get.statuses) == [pb.PAGE_STATUS_MISS]


async def test_a_late_reply_is_a_deadline_and_the_client_goes_on(
    client: AsyncClient, sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = await client.create_pool()
    await client.put(pool, 1, 0, sample_pages[0])
    release = asyncio.Event()
    real = TmemServicer._get_page

    async def held(
        servicer: TmemServicer, pool: int, oid: int, index: int, exclusive: bool
    ) -> bytes | PageError | None:
        await release.wait()
        return await real(servicer, pool, oid, index, exclusive)

    monkeypatch.setattr(TmemServicer, "_get_page", held)
    with pytest.raises(DeadlineExceeded) as info:
        await client.get(pool, 1, 0, timeout=0.05)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    monkeypatch.setattr(TmemServicer, "_get_page", real)
    release.set()  # the late reply arrives and is dropped; the next call gets its own
    assert await asyncio.wait_for(client.get(pool, 1, 0), BOUND) == sample_pages[0]


async def test_draining_ends_the_page_stream_and_refuses_later_calls(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    pool = await client.create_pool()
    await client.put(pool, 1, 0, sample_pages[0])  # the client's page stream is open
    assert node.gate.in_flight == 1
    stopping = asyncio.create_task(node.stop(grace=2 * BOUND))
    for _ in range(int(BOUND * 100)):  # the idle page stream does not hold the drain
        if node.gate.draining and node.gate.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert node.gate.draining and node.gate.in_flight == 0
    with pytest.raises(Unavailable):
        await client.get(pool, 1, 0)
    await asyncio.wait_for(stopping, BOUND)
