# The NBD shell's batching: queued requests cut into engine batches (node/nbd/plan.py's groups), and
# a burst of pipelined requests on a real socket - overlapping writes, reads between them,
# unaligned ones - taking effect in the order sent, and every received request answered when the
# server stops.
from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.nbd.plan import GROUP_PAGES, READ_GROUP_PAGES, Kind, blocks_of, groups
from ramster.nbd import (
    CommandFlag,
    Error,
    Export,
    Flush,
    Read,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    GREETING,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    Command,
    Info,
    Option,
    info_request,
    option_request,
)
from tests.nbd.conftest import MiB, ServerThread
from tests.nbd.test_clients import recv_exactly

NONE = CommandFlag(0)


def read(block: int, blocks: int = 1) -> Read:
    return Read(0, block * 4096, blocks * 4096, NONE)


def write(block: int, blocks: int = 1, offset: int = 0) -> Write:
    data = bytes(blocks * 4096)
    return Write(0, block * 4096 + offset, len(data), NONE, data)


def shape(requests: list[Request]) -> list[list[str]]:
    return [
        [type(r).__name__[0] + str(r.offset // 4096) for r in g.requests] for g in groups(requests)
    ]


def test_runs_of_reads_and_aligned_writes_become_one_batch_each() -> None:
    batch: list[Request] = [read(1), read(2), read(1), write(3), write(4), read(5)]
    assert shape(batch) == [["R1", "R2", "R1"], ["W3", "W4"], ["R5"]]


def test_a_block_written_twice_starts_a_new_batch() -> None:
    assert shape([write(1), write(2), write(1), write(3)]) == [["W1", "W2"], ["W1", "W3"]]
    assert shape([write(1, 4), write(3)]) == [["W1"], ["W3"]]


def test_zeroes_and_trims_join_writes_and_a_flush_joins_any_group() -> None:
    batch: list[Request] = [
        write(1),
        WriteZeroes(0, 2 * 4096, 2 * 4096, NONE),  # blocks 2 and 3
        Trim(0, 4 * 4096 + 100, 2 * 4096, NONE),  # block 5 whole, the edges are nothing
        Flush(0, 0, 0, NONE),
        write(4),
        read(1),
        Flush(0, 0, 0, NONE),
        read(2),
    ]
    assert shape(batch) == [["W1", "W2", "T4", "F0", "W4"], ["R1", "F0", "R2"]]
    assert shape([Flush(0, 0, 0, NONE), read(1)]) == [["F0"], ["R1"]]


def test_a_block_zeroed_then_written_starts_a_new_batch() -> None:
    zero = WriteZeroes(0, 4096, 4096, NONE)
    assert shape([write(1), zero, write(2)]) == [["W1"], ["W1", "W2"]]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("WZTFR"), st.integers(0, 40), st.integers(0, 70), st.booleans()),
        max_size=60,
    )
)
def test_write_groups_never_touch_a_block_twice_and_are_cut_only_where_they_must(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    """Sequential runs, overlaps, empty TRIMs and flushes: groups() cuts exactly where a group
    would touch a block again or exceed GROUP_PAGES (READ_GROUP_PAGES for reads), or the kind
    changes."""
    make: dict[str, Callable[[int, int], Request]] = {"W": write, "R": read}
    requests: list[Request] = []
    for kind, block, blocks, odd in steps:
        if kind in make:
            requests.append(make[kind](block, blocks or 1))
        elif kind == "F":
            requests.append(Flush(0, 0, 0, NONE))
        else:
            cls = Trim if kind == "T" else WriteZeroes
            requests.append(cls(0, block * 4096 + 2048 * odd, blocks * 4096, NONE))
    got = list(groups(requests))
    assert [r for g in got for r in g.requests] == requests
    for at, group in enumerate(got):
        held = [b for r in group.requests for b in covered(r)]
        if group.kind is Kind.WRITE:
            assert len(held) == len(set(held))
        if at + 1 < len(got) and group.kind is not Kind.ALONE:
            after = got[at + 1]
            first = after.requests[0]
            more = covered(first)
            assert (
                after.kind is not group.kind
                or len(held) + len(more)
                > (READ_GROUP_PAGES if group.kind is Kind.READ else GROUP_PAGES)
                or (group.kind is Kind.WRITE and not set(held).isdisjoint(more))
            ), (group, first)


def covered(request: Request) -> range:
    """The blocks a request takes in its group (plan.blocks_of)."""
    _, first, stop = blocks_of(request)
    return range(first, stop)


def test_other_requests_run_alone_and_in_order() -> None:
    batch: list[Request] = [
        write(1),
        write(2, offset=100),  # unaligned: read-modify-write, alone
        WriteZeroes(0, 3 * 4096 + 1, 4096, NONE),  # unaligned: alone
        Trim(0, 0, (GROUP_PAGES + 1) * 4096, NONE),  # bigger than a group: its own
        write(3),
        Flush(0, 0, 0, NONE),
        read(1),
    ]
    assert shape(batch) == [["W1"], ["W2"], ["W3"], ["T0"], ["W3", "F0"], ["R1"]]


def negotiate(server: ServerThread) -> socket.socket:
    """A raw connection in transmission on export "disk"."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    recv_exactly(sock, GREETING.size)
    sock.sendall(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    sock.sendall(option_request(Option.GO, info_request("disk", (Info.BLOCK_SIZE,))))
    while True:
        _, _, reply, length = OPTION_REPLY_HEADER.unpack(
            recv_exactly(sock, OPTION_REPLY_HEADER.size)
        )
        recv_exactly(sock, length)
        if reply == 1:  # ACK: transmission
            return sock


@pytest.mark.parametrize(
    ("blocks", "lengths", "codec_threads"),
    [
        (64, [1, 2], 0),  # 4 KiB requests, many to the same block
        (512, [64, 96, 200], 1),  # groups big enough for the codec worker, planned ahead
    ],
)
def test_a_burst_of_pipelined_requests_takes_effect_in_order(
    blocks: int, lengths: list[int], codec_threads: int
) -> None:
    rng = random.Random(7)
    size = blocks * 4096
    model = bytearray(size)
    burst, expected = [], {}
    for handle in range(1, 601):  # requests over `blocks` blocks, many to the same block
        block, dice = rng.randrange(blocks), rng.random()
        offset = block * 4096 + (rng.randrange(4096) if rng.random() < 0.2 else 0)
        length = min(size - offset, rng.choice([*(n * 4096 for n in lengths), 300]))
        if dice < 0.5:
            data = (
                rng.randbytes(length)
                if dice < 0.3
                else (rng.randbytes(64) * (length // 64 + 1))[:length]
            )
            model[offset : offset + length] = data
            burst.append(
                REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, handle, offset, length)
            )
            burst.append(data)
            expected[handle] = b""
        elif dice < 0.65:  # zeroes, or a trim (its whole blocks read as zeros, edges untouched)
            command = Command.WRITE_ZEROES if dice < 0.6 else Command.TRIM
            lo, hi = offset, offset + length
            if command == Command.TRIM:
                lo, hi = -(-lo // 4096) * 4096, hi // 4096 * 4096
            model[lo:hi] = bytes(max(0, hi - lo))
            burst.append(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, command, handle, offset, length))
            expected[handle] = b""
        elif dice < 0.7:
            burst.append(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.FLUSH, handle, 0, 0))
            expected[handle] = b""
        else:
            burst.append(
                REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, handle, block * 4096, 4096)
            )
            expected[handle] = bytes(model[block * 4096 : (block + 1) * 4096])
    disk = [Export("disk", max(MiB, size))]
    with ServerThread(disk, codec_threads=codec_threads) as server, negotiate(server) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"".join(burst),), daemon=True)
        sender.start()  # all at once: the server sees them queued
        got = {}
        for _ in expected:
            _, error, handle = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))
            assert error == 0
            got[handle] = recv_exactly(sock, len(expected[handle]))
        sender.join(30)
        sock.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, 0, 0, size))
        _, error, _ = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))
        assert error == 0 and recv_exactly(sock, size) == model  # and what stays is the last
    assert got == expected


def test_a_stopping_server_answers_every_request_it_received() -> None:
    with ServerThread([Export("disk", MiB)]) as server:
        sock = negotiate(server)
        burst = [
            REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, h, h % 256 * 4096, 4096)
            for h in range(1, 301)
        ]
        sock.sendall(b"".join(burst))  # 8 KiB: one segment on loopback, received at once
        header = recv_exactly(sock, 16)  # the server is at it: stop it now
        assert server.server is not None
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=30), server.loop)
        answered = set()
        while header:  # until the server closes
            _, error, handle = SIMPLE_REPLY_HEADER.unpack(header)
            assert error in (0, Error.ESHUTDOWN)
            if error == 0:
                assert len(recv_exactly(sock, 4096)) == 4096
            answered.add(handle)
            header = recv_exactly(sock, 16)
        stopping.result(timeout=30)
        sock.close()
    assert answered == set(range(1, 301))


def test_a_corrupt_block_fails_only_the_reads_that_cover_it(sample_pages: list[bytes]) -> None:
    pages = sample_pages[:4]
    with ServerThread([Export("disk", MiB)]) as server, negotiate(server) as sock:
        for block, page in enumerate(pages):
            header = REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, 0, block * 4096, 4096)
            sock.sendall(header + page)
            assert SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))[1] == 0
        assert server.server is not None and server.engine is not None
        engine, pool = server.engine, server.server.exports["disk"].pool

        def corrupt() -> None:  # flip a payload byte of block 1's zpage in the arena
            p = engine.pool(pool)
            handle = p.index.get(0, 1)
            frame, start, _ = dict(p.allocator_of(handle).extents())[handle & ((1 << 56) - 1)][0]
            engine.arena.view[frame * 4096 + start + 30] ^= 0xFF

        server.call(corrupt)
        reads = [(1, 0, 8192), (2, 4096, 100), (3, 8192, 8192), (4, 100, 8000)]  # one group
        sock.sendall(
            b"".join(
                REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, handle, offset, length)
                for handle, offset, length in reads
            )
        )
        got = {}
        for _ in reads:
            _, error, handle = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))
            length = reads[handle - 1][2]
            got[handle] = (error, recv_exactly(sock, length) if error == 0 else b"")
    whole = b"".join(pages)
    assert (
        got
        == {
            1: (Error.EIO, b""),  # blocks 0 and 1
            2: (Error.EIO, b""),  # inside block 1
            3: (0, whole[8192:16384]),  # blocks 2 and 3, intact
            4: (Error.EIO, b""),  # across blocks 0 and 1
        }
    )


def test_zeroes_and_writes_of_one_block_in_a_burst_keep_their_order() -> None:
    a, b, c = (bytes([n]) * 4096 for n in (1, 2, 3))
    burst = [  # W1 Z1 W2 W1 W3 Z3, then reads: groups() must cut where a block comes again
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, 1, 4096, 4096) + a,
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE_ZEROES, 2, 4096, 4096),
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, 3, 8192, 4096) + c,
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, 4, 4096, 4096) + b,
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE, 5, 12288, 4096) + c,
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.WRITE_ZEROES, 6, 12288, 4096),
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, 7, 4096, 3 * 4096),
    ]
    with ServerThread([Export("disk", MiB)]) as server, negotiate(server) as sock:
        sock.sendall(b"".join(burst))
        replies = [SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))[1:] for _ in range(7)]
        assert replies == [(0, handle) for handle in range(1, 8)]  # groups answer in order
        assert recv_exactly(sock, 3 * 4096) == b + c + bytes(4096)
