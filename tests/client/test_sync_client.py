# The blocking Client against a node process: the calls a script makes, and its errors.
from __future__ import annotations

import pytest

from ramster.client import (
    MAX_BATCH_PAGES,
    Client,
    InvalidArgument,
    KeyRange,
    NotFound,
    Outcome,
    RamsterError,
    Unavailable,
)
from ramster.client.local import LocalNode


def test_round_trip(local_node: LocalNode, sample_pages: list[bytes]) -> None:
    with Client(local_node.target) as client:
        assert client.health() == "SERVING"
        pool = client.create_pool("persistent", "zbud")
        pages = [sample_pages[n % 88] for n in range(MAX_BATCH_PAGES + 10)]
        outcomes = client.put_many(pool, 1, 0, pages)
        assert set(outcomes) == {Outcome.STORED}
        assert client.get_many(pool, 1, 0, len(pages)).pages == pages
        assert client.put(pool, 2, 0, sample_pages[5]) is Outcome.STORED
        assert client.get(pool, 2, 0) == sample_pages[5]
        assert client.put_batch(pool, [(3, 0)], [sample_pages[6]]) == [Outcome.STORED]
        assert client.get_batch(pool, KeyRange(3, 0, 2)).pages == [sample_pages[6], None]
        assert client.flush_page(pool, 2, 0) is True
        assert client.flush_object(pool, 1) == len(pages)
        assert client.stats().stored_pages == 1
        assert any(p.pool == pool for p in client.list_pools())
        assert client.destroy_pool(pool) == 1


def test_errors_name_their_status(local_node: LocalNode) -> None:
    with Client(local_node.target) as client:
        with pytest.raises(NotFound) as info:
            client.get(12345, 1, 1)
        assert info.value.code.name == "NOT_FOUND" and "NOT_FOUND" in str(info.value)
        pool = client.create_pool()
        with pytest.raises(InvalidArgument, match="4096"):
            client.put(pool, 1, 1, b"tiny")
        with pytest.raises(RamsterError, match="pool kind"):
            client.create_pool("forever")


def test_unreachable_node_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=10) as client, pytest.raises(Unavailable):
        client.stats()
