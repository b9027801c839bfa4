# The NBD server trims the heap (node/heap.py's HeapTrimmer) once its exports have moved
# TRIM_AFTER pages and then gone quiet, and not while nothing moves; its connections then give
# back the input chunks they kept for reuse, and the arena the freed frames it kept warm.  How
# much RSS that saves is a benchmark number (`ramster bench nbd`: data per GiB of RSS), not
# asserted here.
from __future__ import annotations

import time

import pytest

from node import heap
from node.nbd import server as nbd_server
from ramster.nbd import Export
from ramster.nbd.wire import Command
from ramster.zcache import PAGE_SIZE
from ramster.zcache.arena import Arena
from tests.nbd.conftest import MiB, ServerThread
from tests.nbd.test_batching import negotiate
from tests.nbd.test_codec import image, reply, request

PAGES = 64  # pages written, and the trimmer's threshold for the test


def trims(server: ServerThread) -> int:
    assert server.server is not None
    return server.call(lambda: server.server.trimmer.trims if server.server else 0)


def spares(server: ServerThread) -> int:
    """Input chunks the server's connections keep for reuse."""
    assert server.server is not None
    connections = server.server.connections
    return server.call(lambda: sum(len(c.conn._spare) for c in connections))


def test_the_heap_is_trimmed_once_writes_pause_and_not_before(
    sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heap, "TRIM_AFTER", PAGES)
    monkeypatch.setattr(nbd_server, "TRIM_INTERVAL", 0.05)
    cooled: list[int] = []
    cool = Arena.cool

    def counted_cool(self: Arena) -> int:
        cooled.append(cool(self))
        return cooled[-1]

    monkeypatch.setattr(Arena, "cool", counted_cool)
    data = image(sample_pages, PAGES)
    with ServerThread([Export("disk", 4 * MiB)]) as server, negotiate(server) as sock:
        time.sleep(0.3)
        assert trims(server) == 0, "trimmed with nothing moved"
        sock.sendall(request(Command.WRITE, 1, 0, PAGES // 2) + data[: PAGES // 2 * PAGE_SIZE])
        assert reply(sock)[:2] == (1, 0)
        time.sleep(0.3)
        assert trims(server) == 0, "trimmed before TRIM_AFTER pages moved"
        for n in range(13):  # 1.6 MiB, more than one input chunk; the first rewrites raw pages
            sock.sendall(request(Command.WRITE, n + 2, n * PAGES // 2, PAGES // 2))
            sock.sendall(data[PAGES // 2 * PAGE_SIZE :])
        assert sorted(reply(sock)[:2] for _ in range(13)) == [(n, 0) for n in range(2, 15)]
        assert spares(server) > 0  # input chunks kept for reuse while traffic flows
        deadline = time.monotonic() + 10
        while not trims(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trims(server) == 1
        assert spares(server) == 0  # ... given back once it paused
        assert cooled and cooled[0] > 0  # and the arena the frames freed by the rewrite
        time.sleep(0.3)
        assert trims(server) == 1, "trimmed again with nothing moved since"


def test_without_glibc_a_pause_still_lets_go_of_the_cached_input(
    sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where malloc_trim is missing (musl, macOS) nothing is trimmed, but once writes pause the
    connections still drop their spare input chunks."""
    monkeypatch.setattr(heap, "TRIM_AFTER", PAGES)
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    monkeypatch.setattr(nbd_server, "TRIM_INTERVAL", 0.05)
    data = image(sample_pages, PAGES)
    with ServerThread([Export("disk", 4 * MiB)]) as server, negotiate(server) as sock:
        for n in range(12):  # 1.5 MiB: more than one input chunk
            sock.sendall(request(Command.WRITE, n + 1, n * PAGES // 2, PAGES // 2))
            sock.sendall(data[PAGES // 2 * PAGE_SIZE :])
        assert sorted(reply(sock)[:2] for _ in range(12)) == [(n, 0) for n in range(1, 13)]
        deadline = time.monotonic() + 10
        while spares(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spares(server) == 0
        assert trims(server) == 0
