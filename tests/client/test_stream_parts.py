# A stream batch larger than STREAM_PART_PAGES goes as several requests whose replies come back
# together as the batch's: outcomes and pages in the caller's order, a miss where it was, and a
# batch that fails in any part fails whole; the whole batch is checked before any part is sent.
# A batch stream's parts and replies give the core away (ramster.cores), single-page calls never.
from __future__ import annotations

from typing import Any

import pytest

from ramster.bulkwire import Parts
from ramster.client import AsyncClient, InvalidArgument, KeyRange, NotFound, PageStatus
from ramster.client.aio import PUT, STREAM_PART_PAGES, Stream
from ramster.client.local import LocalNode
from ramster.cores import CoreYield

COUNT = STREAM_PART_PAGES * 2 + 17  # three parts, the last one short


async def test_a_big_batch_comes_back_whole(
    local_node: LocalNode, sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    pages = [sample_pages[n % len(sample_pages)] for n in range(COUNT)]
    sent: list[int] = []  # the field of each request sent
    send = Stream.send

    async def counted(stream: Stream, field: int, body: Parts, decode: Any) -> Any:
        sent.append(field)
        return await send(stream, field, body, decode)

    monkeypatch.setattr(Stream, "send", counted)
    async with AsyncClient(local_node.target) as client:
        pool = await client.create_pool()
        async with client.stream() as stream:
            put = await stream.put_batch(pool, KeyRange(5, 0, COUNT), pages)
            assert sent == [PUT] * 3  # (in_flight would race: a reply may be in already)
            outcomes = await put
            missing = (5, COUNT + 3)  # never stored
            keys = [(5, n) for n in range(COUNT)]
            keys.insert(STREAM_PART_PAGES, missing)
            result = await (await stream.get_batch(pool, keys))
        await client.destroy_pool(pool)
    assert len(outcomes) == COUNT
    expected = [None if o.refused else p for o, p in zip(outcomes, pages, strict=True)]
    expected.insert(STREAM_PART_PAGES, None)
    assert result.pages == expected
    assert result.statuses[STREAM_PART_PAGES] is PageStatus.MISS


async def test_a_failing_part_fails_the_batch(local_node: LocalNode) -> None:
    async with AsyncClient(local_node.target) as client, client.stream() as stream:
        with pytest.raises(InvalidArgument, match="exceeds the limit of 4096"):
            await stream.get_batch(0, KeyRange(1, 0, 4097))
        assert stream.in_flight == 0  # refused before a part was sent
        get = await stream.get_batch(2**31, KeyRange(1, 0, COUNT))  # no such pool
        with pytest.raises(NotFound):
            await get


async def test_bulk_parts_give_the_core_away_and_page_calls_never(
    local_node: LocalNode, sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    offered: list[CoreYield] = []
    monkeypatch.setattr(CoreYield, "now", lambda cores: offered.append(cores))
    pages = [sample_pages[n % len(sample_pages)] for n in range(COUNT)]
    async with AsyncClient(local_node.target) as client:
        pool = await client.create_pool()
        await client.put(pool, 1, 0, pages[0])
        assert await client.get(pool, 1, 0) == pages[0]
        assert offered == []  # a page call hands its own core to nobody
        async with client.stream() as stream:
            await (await stream.put_batch(pool, KeyRange(5, 0, COUNT), pages))
        assert len(offered) == 6  # before each of the three parts is sent, after each reply
        offered.clear()
        assert await client.get(pool, 5, COUNT - 1) == pages[-1]
        assert offered == []
        await client.destroy_pool(pool)
