# A long TRIM or WRITE_ZEROES (mkfs and blkdiscard send one for the whole device) flushes what the
# export's pool holds in the range, in engine calls of well under 2 * FLUSH_KEYS keys with the
# loop yielded between two calls, and never builds the keys of the whole range: on a big export
# the range can be 2**20 times what is stored.
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from itertools import pairwise

from node.nbd.blocks import FLUSH_KEYS
from ramster.nbd import Export
from ramster.nbd.wire import SIMPLE_REPLY_HEADER, Command
from tests.nbd.conftest import MiB, ServerThread
from tests.nbd.test_batching import negotiate
from tests.nbd.test_clients import recv_exactly, request

GiB = 1024 * MiB
HELD = [*range(3000), (1 << 20) + 5, (3 << 20) - 1]  # blocks written: objects 0, 1 and 2


def call(sock: socket.socket, command: int, block: int, blocks: int, data: bytes = b"") -> bytes:
    """One request, answered OK; the data of a READ."""
    sock.sendall(request(command, block * 4096, blocks * 4096) + data)
    _, error, _ = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, SIMPLE_REPLY_HEADER.size))
    assert error == 0
    return recv_exactly(sock, blocks * 4096) if command == Command.READ else b""


def test_a_long_trim_flushes_what_is_stored_a_window_at_a_time() -> None:
    pages = {block: os.urandom(4096) for block in HELD}
    with ServerThread([Export("disk", 16 * GiB)], pool_limit=64 * MiB) as server:
        assert server.engine is not None
        engine, loop = server.engine, server.loop
        flushes: list[list[tuple[int, int]]] = []
        ticks = [0]  # callbacks the loop ran meanwhile, at each flush
        between: list[int] = []
        flush: Callable[[int, list[tuple[int, int]]], int] = engine.flush_pages

        def spy(pool: int, keys: list[tuple[int, int]]) -> int:
            flushes.append(list(keys))
            between.append(ticks[0])
            return flush(pool, keys)

        ticking = threading.Event()

        def tick() -> None:  # runs whenever the loop gets a turn
            ticks[0] += 1
            if ticking.is_set():
                loop.call_soon(tick)

        with negotiate(server) as sock:
            for block, page in pages.items():
                call(sock, Command.WRITE, block, 1, page)
            engine.flush_pages = spy  # type: ignore[method-assign, assignment]
            ticking.set()
            server.call(tick)
            call(sock, Command.TRIM, 1, (1 << 20) - 1)  # object 0 but block 0: 4 GiB - 4 KiB
            call(sock, Command.WRITE_ZEROES, 3 << 20, 1 << 19)  # half of object 3: nothing
            ticking.clear()
            assert call(sock, Command.READ, 0, 2) == pages[0] + bytes(4096)
            for block in HELD[1:3000]:
                assert call(sock, Command.READ, block, 1) == bytes(4096)
            for block in HELD[3000:]:  # outside the ranges
                assert call(sock, Command.READ, block, 1) == pages[block]
    flushed = [key for keys in flushes for key in keys]
    assert sorted(flushed) == [(0, block) for block in range(1, 3000)]  # just what was held
    assert len(flushes) >= 2 and max(map(len, flushes)) < 2 * FLUSH_KEYS
    assert all(b > a for a, b in pairwise(between))  # a yield between
