# The client refuses a key the node would refuse, before sending anything: InvalidArgument, which
# is a ValueError, naming the field and the value.  The target is an address nobody answers, so a
# request that was sent would fail with UNAVAILABLE instead.
from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import pytest

from ramster.client import AsyncClient, Client, InvalidArgument, KeyRange

NOBODY = "127.0.0.1:1"
BIG = 2**32 + 5
HUGE = 2**64  # past uint64: no pool id
PAGE = bytes(4096)

Call = Callable[[AsyncClient], Awaitable[object]]
CASES: dict[str, tuple[Call, str]] = {
    "put pool": (lambda c: c.put(HUGE, 1, 0, PAGE), f"pool {HUGE} is out of range [0, 2**64)"),
    "put index": (lambda c: c.put(0, 1, BIG, PAGE), f"index {BIG} is out of range [0, 2**32)"),
    "put negative index": (lambda c: c.put(0, 1, -1, PAGE), "index -1 is out of range"),
    "put oid": (lambda c: c.put(0, 2**64, 0, PAGE), f"oid {2**64} is out of range [0, 2**64)"),
    "get pool": (lambda c: c.get(HUGE, 1, 0), f"pool {HUGE}"),
    "get index": (lambda c: c.get(0, 1, BIG), f"index {BIG}"),
    "flush_page index": (lambda c: c.flush_page(0, 1, BIG), f"index {BIG}"),
    "flush_object pool": (lambda c: c.flush_object(HUGE, 1), f"pool {HUGE}"),
    "destroy_pool": (lambda c: c.destroy_pool(-1), "pool -1"),
    "put_batch pool": (lambda c: c.put_batch(HUGE, KeyRange(1, 0, 1), [PAGE]), f"pool {HUGE}"),
    "put_batch range past 2**32": (
        lambda c: c.put_batch(0, KeyRange(1, 2**32 - 1, 2), [PAGE, PAGE]),
        f"indexes holds {2**32}",
    ),
    "get_batch pairs": (lambda c: c.get_batch(0, [(1, 0), (1, BIG)]), f"indexes holds {BIG}"),
    "get_batch oids": (lambda c: c.get_batch(0, [(-2, 0)]), "oids holds -2"),
    "get_many": (lambda c: c.get_many(0, 1, 2**32 - 2, 3), f"indexes holds {2**32}"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_async_client_refuses_keys_out_of_range(case: str) -> None:
    call, message = CASES[case]
    async with AsyncClient(NOBODY, timeout=30) as client:
        with pytest.raises(InvalidArgument, match=re.escape(message)) as info:
            await call(client)
    assert isinstance(info.value, ValueError)


async def test_stream_refuses_keys_out_of_range() -> None:
    async with AsyncClient(NOBODY, timeout=30) as client:
        with pytest.raises(InvalidArgument, match=f"indexes holds {BIG}"):
            async with client.stream() as stream:
                await stream.get_batch(0, [(1, BIG)])
        with pytest.raises(InvalidArgument, match=f"pool {HUGE}"):
            async with client.stream() as stream:
                await stream.flush_object(HUGE, 1)


def test_blocking_client_refuses_keys_out_of_range() -> None:
    with Client(NOBODY, timeout=30) as client, pytest.raises(ValueError, match=f"index {BIG}"):
        client.put(0, 1, BIG, PAGE)
