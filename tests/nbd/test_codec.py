# Where the NBD server's codec work runs (node/nbd/server.py): on the loop by default; with codec
# workers (--worker-threads), big write and read groups are handed to them (native threads, so
# the test sees the hand-over), small ones coded on the loop.  Pages come back byte-identical
# either way, a failing worker fails its group with EIO and the connection goes on, and a server
# stopped while a group is in a worker answers every request it received, each write answered
# OK being stored whole.
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from node.codecworkers import CodecWorkers
from node.nbd.connection import NbdConnection
from node.nbd.server import CODEC_PAGES, OFFLOAD_PAGES, READ_CODEC_PAGES
from ramster.nbd import Error, Export
from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    GREETING,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    Command,
    Option,
    info_request,
    option_request,
)
from ramster.zcache import PAGE_SIZE, Encodings, PageEncoder, PutResult, SealedPages, ZCache
from tests.nbd.conftest import MiB, ServerThread, eventually
from tests.nbd.test_batching import negotiate
from tests.nbd.test_clients import recv_exactly

BIG = CODEC_PAGES + 5  # pages of a request the codec workers take (in two hops; a group each)


def request(command: Command, handle: int, block: int, blocks: int) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, 0, command, handle, block * PAGE_SIZE,
                               blocks * PAGE_SIZE)  # fmt: skip


def reply(sock: socket.socket, length: int = 0) -> tuple[int, int, bytes]:
    """(handle, error, data) of the next reply; data only when the request succeeded."""
    _, error, handle = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))
    return handle, error, recv_exactly(sock, length) if error == 0 and length else b""


def image(sample_pages: list[bytes], blocks: int) -> bytes:
    """Real pages (compressible, incompressible and zero) for `blocks` blocks."""
    pages = [*sample_pages, bytes(PAGE_SIZE)]
    return b"".join(pages[b % len(pages)] for b in range(blocks))


@pytest.fixture
def threads_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """The threads that encoded and opened pages in Python calls ("encode", "open"), and the
    chunks handed to the native codec workers ("to workers": "encode" or "open")."""
    seen: dict[str, list[str]] = {"encode": [], "open": [], "to workers": []}
    encode, open_ = PageEncoder.encode, SealedPages.open
    to_encode, to_open = CodecWorkers.encode, CodecWorkers.open

    def encode_spy(self: PageEncoder, *args: object) -> list[bytes | None]:
        seen["encode"].append(threading.current_thread().name)
        return encode(self, *args)  # type: ignore[arg-type]

    def open_spy(self: SealedPages) -> SealedPages:
        seen["open"].append(threading.current_thread().name)
        return open_(self)

    def to_encode_spy(self: CodecWorkers, *args: Any) -> asyncio.Future[Encodings]:
        seen["to workers"].append("encode")
        return to_encode(self, *args)

    def to_open_spy(self: CodecWorkers, sealed: SealedPages) -> asyncio.Future[SealedPages]:
        seen["to workers"].append("open")
        return to_open(self, sealed)

    monkeypatch.setattr(PageEncoder, "encode", encode_spy)
    monkeypatch.setattr(SealedPages, "open", open_spy)
    monkeypatch.setattr(CodecWorkers, "encode", to_encode_spy)
    monkeypatch.setattr(CodecWorkers, "open", to_open_spy)
    yield seen


@pytest.mark.parametrize("workers", [0, 1])
def test_big_groups_go_through_the_codec_workers_and_read_back_identical(
    sample_pages: list[bytes], threads_seen: dict[str, list[str]], workers: int
) -> None:
    data = image(sample_pages, 3 * BIG)
    server_thread = ServerThread([Export("disk", 4 * MiB)], codec_threads=workers)
    with server_thread as server, negotiate(server) as sock:
        for n in range(3):  # three big writes in one burst
            sock.sendall(request(Command.WRITE, n + 1, n * BIG, BIG))
            sock.sendall(data[n * BIG * PAGE_SIZE : (n + 1) * BIG * PAGE_SIZE])
        assert sorted(reply(sock)[:2] for _ in range(3)) == [(1, 0), (2, 0), (3, 0)]
        sock.sendall(request(Command.READ, 4, 0, 3 * BIG))
        assert reply(sock, len(data)) == (4, 0, data)
        small = [request(Command.READ, 5 + b, b, 1) for b in range(OFFLOAD_PAGES // 2)]
        sock.sendall(b"".join(small))  # one group too small for a hop: opened on the loop
        for b in range(OFFLOAD_PAGES // 2):
            assert reply(sock, PAGE_SIZE) == (5 + b, 0, data[b * PAGE_SIZE : (b + 1) * PAGE_SIZE])
        loop_thread = server.call(lambda: threading.current_thread().name)
    # Python's calls run on the loop (reads open zpages in place, copies of those straddling two
    # frames through SealedPages); with workers, only the small read group is coded there
    assert set(threads_seen["encode"]) <= {loop_thread}
    assert set(threads_seen["open"]) <= {loop_thread}
    if not workers:
        assert threads_seen["encode"] and not threads_seen["to workers"]
        return
    assert not threads_seen["encode"]
    # each write (a group) in hops of CODEC_PAGES, then the read of all three in its own
    hops = ["encode"] * -(-BIG // CODEC_PAGES) * 3 + ["open"] * -(-3 * BIG // READ_CODEC_PAGES)
    assert threads_seen["to workers"] == hops


def test_a_failing_codec_worker_fails_its_group_with_eio_and_the_connection_goes_on(
    sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image(sample_pages, BIG)
    encode, open_ = CodecWorkers.encode, CodecWorkers.open
    broken = {"encode": True, "open": True}

    def failed() -> asyncio.Future[Any]:
        """A job as a worker that panicked finishes it (node/codecworkers.py)."""
        future = asyncio.get_running_loop().create_future()
        future.set_exception(RuntimeError("a codec worker panicked"))
        return future

    def failing_encode(self: CodecWorkers, *args: Any) -> asyncio.Future[Encodings]:
        return failed() if broken["encode"] else encode(self, *args)

    def failing_open(self: CodecWorkers, sealed: SealedPages) -> asyncio.Future[SealedPages]:
        return failed() if broken["open"] else open_(self, sealed)

    monkeypatch.setattr(CodecWorkers, "encode", failing_encode)
    monkeypatch.setattr(CodecWorkers, "open", failing_open)
    codec = ServerThread([Export("disk", 4 * MiB)], codec_threads=1)
    with codec as server, negotiate(server) as sock:
        sock.sendall(request(Command.WRITE, 1, 0, BIG) + data)
        assert reply(sock) == (1, Error.EIO, b"")
        broken["encode"] = False
        sock.sendall(request(Command.WRITE, 2, 0, BIG) + data)
        assert reply(sock) == (2, 0, b"")
        sock.sendall(request(Command.READ, 3, 0, BIG))
        assert reply(sock, len(data)) == (3, Error.EIO, b"")
        broken["open"] = False
        sock.sendall(request(Command.READ, 4, 0, BIG))
        assert reply(sock, len(data)) == (4, 0, data)


def test_a_server_stopped_mid_group_answers_and_stores_the_group(
    sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = CodecWorkers.encode

    async def held(self: CodecWorkers, *args: Any) -> Encodings:
        in_codec.set()
        await asyncio.to_thread(go_on.wait, 30)  # with the workers until the server is stopping
        return await encode(self, *args)

    in_codec, go_on = threading.Event(), threading.Event()

    def held_encode(self: CodecWorkers, *args: Any) -> asyncio.Future[Encodings]:
        return asyncio.ensure_future(held(self, *args))

    monkeypatch.setattr(CodecWorkers, "encode", held_encode)
    data = image(sample_pages, BIG + OFFLOAD_PAGES)
    burst = request(Command.WRITE, 1, 0, BIG) + data[: BIG * PAGE_SIZE]
    burst += request(Command.WRITE, 2, BIG, OFFLOAD_PAGES) + data[BIG * PAGE_SIZE :]

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the server may close before the second write
            sock.sendall(burst)

    with ServerThread([Export("disk", 4 * MiB)], codec_threads=1) as server:
        sock = negotiate(server)
        threading.Thread(target=send, args=(sock,), daemon=True).start()
        assert in_codec.wait(30)
        assert server.server is not None and server.engine is not None
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=30), server.loop)
        go_on.set()
        answers = {}
        try:
            while header := sock.recv(16, socket.MSG_WAITALL):  # until the server closes
                _, error, handle = SIMPLE_REPLY_HEADER.unpack(header)
                answers[handle] = error
        except ConnectionResetError:  # it closed with part of the second write unread
            pass
        stopping.result(timeout=30)
        sock.close()
        engine, pool = server.engine, server.server.exports["disk"].pool
        keys = [(0, b) for b in range(BIG + OFFLOAD_PAGES)]
        stored = server.call(lambda: engine.get_batch(pool, keys))
    assert answers[1] == 0  # the group in the codec thread when the stop came: finished
    assert answers.get(2, Error.ESHUTDOWN) in (0, Error.ESHUTDOWN)
    for handle, first, stop in ((1, 0, BIG), (2, BIG, BIG + OFFLOAD_PAGES)):
        if answers.get(handle) == 0:  # a missing block is a zero page written (a hole)
            pages = [bytes(PAGE_SIZE) if p is None else p for p in stored[first:stop]]
            assert b"".join(cast(list[bytes], pages)) == data[first * PAGE_SIZE : stop * PAGE_SIZE]


class Transport(asyncio.Transport):
    """What a connection writes, kept; reading is never paused for real (all input is fed)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.out += part

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


HANDSHAKE = CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE) + option_request(
    Option.GO, info_request("disk", ())
)


@pytest.fixture
def coded(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Event]:
    """The order in which encodings went to the codec workers ("encode") and put batches were
    filed ("file"); the first encoding waits in the worker until the event is set (set it
    first for none to wait)."""
    events: list[str] = []
    go_on = threading.Event()
    encode, file_encoded = CodecWorkers.encode, ZCache.file_encoded

    async def held(self: CodecWorkers, *args: Any) -> Encodings:
        await asyncio.to_thread(go_on.wait, 30)
        return await encode(self, *args)

    def encode_spy(self: CodecWorkers, *args: Any) -> asyncio.Future[Encodings]:
        events.append("encode")
        if events.count("encode") == 1 and not go_on.is_set():
            return asyncio.ensure_future(held(self, *args))
        return encode(self, *args)

    def file_spy(self: ZCache, *args: Any, **kwargs: Any) -> list[PutResult]:
        events.append("file")
        return file_encoded(self, *args, **kwargs)

    monkeypatch.setattr(CodecWorkers, "encode", encode_spy)
    monkeypatch.setattr(ZCache, "file_encoded", file_spy)
    return events, go_on


def feed(connection: NbdConnection, data: bytes) -> None:
    """Bytes from the client, all at once (on the server's loop: before its task runs)."""
    view = memoryview(data)
    while view:
        buffer = connection.get_buffer(-1)
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        connection.buffer_updated(n)
        view = view[n:]


def test_write_groups_encode_ahead_and_take_effect_in_order(
    sample_pages: list[bytes], coded: tuple[list[str], threading.Event]
) -> None:
    """Requests received at once: the next write groups are handed to the codec workers before
    the first is filed, and still take effect in the order sent (the same blocks written by
    consecutive groups, reads between them)."""
    events, go_on = coded
    go_on.set()
    pages = OFFLOAD_PAGES  # a group the workers take, in one hop
    first = image(sample_pages, pages)
    second = image(sample_pages[::-1], pages)
    assert first != second
    burst = [request(Command.WRITE, 1, 0, pages) + first]
    burst.append(request(Command.WRITE, 2, 0, pages) + second)  # the same blocks: a new group
    burst.append(request(Command.READ, 3, 0, pages))
    burst.append(request(Command.WRITE, 4, 0, pages) + first)
    burst.append(request(Command.READ, 5, 0, pages))
    transport = Transport()
    with ServerThread([Export("disk", 4 * MiB)], codec_threads=1) as server:
        assert server.server is not None
        connection = server.call(lambda: NbdConnection(server.server))  # type: ignore[arg-type]

        def connect_and_feed() -> None:
            connection.connection_made(transport)
            feed(connection, HANDSHAKE + b"".join(burst))

        server.call(connect_and_feed)
        want = 2 * (16 + pages * PAGE_SIZE) + 3 * 16
        assert eventually(lambda: server.call(lambda: len(transport.out)) >= GREETING.size + want)
    replies = bytes(transport.out[-want:])
    got = {}
    while replies:
        _, error, handle = SIMPLE_REPLY_HEADER.unpack(replies[:16])
        length = pages * PAGE_SIZE if handle in (3, 5) else 0
        got[handle] = (error, replies[16 : 16 + length])
        replies = replies[16 + length :]
    assert got == {1: (0, b""), 2: (0, b""), 3: (0, second), 4: (0, b""), 5: (0, first)}
    assert events.index("file") >= 2  # the second group went to the workers before the first filed
    assert events.count("encode") == events.count("file") == 3  # each group coded once


def test_requests_arriving_during_a_group_reach_the_codec_workers_at_once(
    sample_pages: list[bytes], coded: tuple[list[str], threading.Event]
) -> None:
    """While the connection's task is in a group (its encoding held in the worker), a write
    group that arrives is planned from the read callback, its encoding started before the
    first group is filed."""
    events, go_on = coded
    pages = OFFLOAD_PAGES
    data = image(sample_pages, 2 * pages)
    first = request(Command.WRITE, 1, 0, pages) + data[: pages * PAGE_SIZE]
    second = request(Command.WRITE, 2, pages, pages) + data[pages * PAGE_SIZE :]
    transport = Transport()
    with ServerThread([Export("disk", 4 * MiB)], codec_threads=1) as server:
        assert server.server is not None and server.engine is not None
        engine, pool = server.engine, server.server.exports["disk"].pool
        connection = server.call(lambda: NbdConnection(server.server))  # type: ignore[arg-type]
        server.call(lambda: connection.connection_made(transport))
        server.call(lambda: feed(connection, HANDSHAKE + first))
        # the first group held in the worker
        assert eventually(lambda: server.call(lambda: list(events)) == ["encode"])
        server.call(lambda: feed(connection, second))
        assert server.call(lambda: list(events)) == ["encode", "encode"]  # nothing filed yet
        go_on.set()
        assert eventually(lambda: server.call(lambda: len(transport.out)) >= GREETING.size + 2 * 16)
        stored = server.call(lambda: engine.get_batch(pool, [(0, b) for b in range(2 * pages)]))
    replies = bytes(transport.out[-2 * 16 :])
    handles = sorted(SIMPLE_REPLY_HEADER.unpack(replies[i : i + 16])[1:] for i in (0, 16))
    assert handles == [(0, 1), (0, 2)]
    assert b"".join(cast(list[bytes], stored)) == data  # a miss or error fails the join
    assert events == ["encode", "encode", "file", "file"]
