# The export's block map (node/nbd/blockmap.py): its file across reopens and size changes, a
# file that is not a map, clearing across steps, what adopt() takes in and counts; and in an
# in-process server, an unaligned write marked in it and a page the engine lost read as EIO.
# (A real crash and restart: tests/nbd/test_node.py.)
from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from node.nbd.blockmap import DATA, HEADER_SIZE, HOLE, LOST, MAGIC, STEP, BlockMap, map_path
from node.nbd.blocks import LOG_SECONDS, ExportBlocks
from node.nbd.plan import WRITE, Group
from ramster.nbd import CommandFlag, Export, Request, Write, WriteZeroes
from ramster.nbd.wire import SIMPLE_REPLY_HEADER, Command, Error
from tests.nbd.conftest import MiB, ServerThread
from tests.nbd.test_batching import negotiate
from tests.nbd.test_clients import recv_exactly, request
from tests.smalldisk import ROOT, fill_up, small_disk


def test_a_map_file_keeps_its_blocks_across_a_reopen_and_follows_the_size(tmp_path: Path) -> None:
    path = map_path(tmp_path, 7)
    first = BlockMap(path, 64)
    assert first.get(0, 64) == bytes(64)
    first.set(10, b"\x01\x01\x00\x01")
    first.close()
    assert path.read_bytes().startswith(MAGIC)
    assert path.stat().st_size == HEADER_SIZE + 64
    grown = BlockMap(path, 128)
    assert grown.get(8, 16) == b"\x00\x00\x01\x01\x00\x01\x00\x00"
    assert grown.get(64, 128) == bytes(64)  # the new blocks hold nothing
    grown.close()
    cut = BlockMap(path, 12)
    assert cut.get(0, 12) == bytes(10) + b"\x01\x01"
    cut.close()
    assert path.stat().st_size == HEADER_SIZE + 12


def test_a_file_that_is_not_a_map_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "nbd-pool-1.map"
    path.write_bytes(b"something else" * 10)
    with pytest.raises(ValueError, match="not an NBD block map"):
        BlockMap(path, 16)
    assert path.read_bytes() == b"something else" * 10


def test_clear_empties_a_range_across_steps_and_nothing_around_it() -> None:
    blocks = 3 * STEP
    block_map = BlockMap(None, blocks)
    block_map.set(0, b"\x01" * blocks)
    block_map.clear(5, 2 * STEP + 7)
    assert block_map.get(0, 5) == b"\x01" * 5
    assert block_map.get(5, 2 * STEP + 7) == bytes(2 * STEP + 2)
    assert block_map.get(2 * STEP + 7, blocks) == b"\x01" * (STEP - 7)
    block_map.clear(0, 0)  # an empty range: nothing
    assert block_map.get(0, 5) == b"\x01" * 5
    block_map.close()


def test_the_file_stays_sparse_and_nothing_held_reads_only_its_data(tmp_path: Path) -> None:
    path = map_path(tmp_path, 3)
    blocks = 3 * STEP
    block_map = BlockMap(path, blocks)
    block_map.set(0, bytes([DATA]) * 10)
    block_map.set(blocks - 10, bytes([DATA]) * 10)
    block_map.close()
    assert path.stat().st_blocks * 512 < STEP  # a thin export costs no disk up front
    reopened = BlockMap(path, blocks)
    assert reopened.adopt(5, blocks - 5, None) == 10  # nothing held: what held data is lost
    assert reopened.get(0, 10) == bytes([DATA]) * 5 + bytes([LOST]) * 5
    assert reopened.get(blocks - 10, blocks) == bytes([LOST]) * 5 + bytes([DATA]) * 5
    reopened.clear(0, blocks)
    assert reopened.get(0, blocks) == bytes(blocks)
    reopened.close()


def test_adopt_takes_in_what_the_index_holds_and_counts_what_it_lacks() -> None:
    block_map = BlockMap(None, 8)
    block_map.set(0, bytes([DATA, DATA, DATA, HOLE, HOLE, LOST, LOST, HOLE]))
    # blocks 0 and 2 came back, 1 did not; 4 holds a page the map did not know of, 5 came back
    held = bytes([1, 0, 1, 0, 1, 1, 0, 0])
    assert block_map.adopt(0, 8, held) == 2
    assert block_map.get(0, 8) == bytes([DATA, LOST, DATA, HOLE, DATA, DATA, LOST, HOLE])
    assert block_map.adopt(4, 8, held[4:]) == 1  # in step: nothing more lost
    assert block_map.adopt(0, 8, bytes(8)) == 6  # an index that lost everything
    assert block_map.get(0, 8) == bytes([LOST, LOST, LOST, HOLE, LOST, LOST, LOST, HOLE])
    block_map.clear(0, 3)
    assert block_map.get(0, 4) == bytes(4)
    block_map.close()


def answer(
    sock: socket.socket, command: int, offset: int, data: bytes = b"", length: int = 0
) -> tuple[Error, bytes]:
    """One request: its error, and a READ's data when it succeeded."""
    sock.sendall(request(command, offset, length or len(data)) + data)
    _, error, _ = SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, SIMPLE_REPLY_HEADER.size))
    read = command == Command.READ and not error
    return Error(error), recv_exactly(sock, length) if read else b""


def test_a_block_whose_page_the_engine_lost_reads_as_eio_and_never_written_ones_as_zeros() -> None:
    with ServerThread([Export("disk", 1 * MiB)]) as server, negotiate(server) as sock:
        assert server.server is not None and server.engine is not None
        blocks, engine = server.server.exports["disk"], server.engine
        assert answer(sock, Command.WRITE, 100, b"x" * 200)[0] is Error.OK  # read-modify-write
        assert answer(sock, Command.WRITE, 4096, b"y" * 4096)[0] is Error.OK
        assert answer(sock, Command.WRITE, 8192, bytes(4096))[0] is Error.OK  # zeros: a hole
        assert server.call(lambda: blocks.map.get(0, 4)) == bytes([DATA, DATA, HOLE, HOLE])
        server.call(lambda: engine.flush_pages(blocks.pool, [(0, 0)]))
        # no page, but not lost: a write of zeros under way reads so (the start finds losses)
        assert answer(sock, Command.READ, 0, length=4096) == (Error.OK, bytes(4096))
        assert server.call(blocks.adopt_index) == 1  # as a start after a crash
        assert answer(sock, Command.READ, 0, length=4096) == (Error.EIO, b"")
        assert answer(sock, Command.READ, 4096, length=4096) == (Error.OK, b"y" * 4096)
        assert answer(sock, Command.READ, 8192, length=8192) == (Error.OK, bytes(8192))
        assert answer(sock, Command.WRITE_ZEROES, 0, length=4096)[0] is Error.OK
        assert answer(sock, Command.READ, 0, length=4096) == (Error.OK, bytes(4096))


@ROOT
def test_a_write_whose_map_finds_no_room_on_disk_fails_with_enospc(tmp_path: Path) -> None:
    with (
        small_disk(tmp_path / "disk", "1M") as disk,
        ServerThread([Export("disk", 1 * MiB)]) as server,
        negotiate(server) as sock,
    ):
        assert server.server is not None
        blocks = server.server.exports["disk"]
        full = BlockMap(map_path(disk, 1), 256)
        fill_up(disk / "filler")
        server.call(lambda: setattr(blocks, "map", full))
        assert answer(sock, Command.WRITE, 4096, b"y" * 4096)[0] is Error.ENOSPC
        assert answer(sock, Command.WRITE, 8192, bytes(4096))[0] is Error.OK  # no change
        assert answer(sock, Command.READ, 8192, length=4096) == (Error.OK, bytes(4096))
        (disk / "filler").unlink()
        assert answer(sock, Command.WRITE, 4096, b"y" * 4096)[0] is Error.OK
        assert full.get(0, 3) == bytes([HOLE, DATA, HOLE])
        full.close()


def test_reads_of_lost_blocks_log_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    with ServerThread([Export("disk", 1 * MiB)]) as server, negotiate(server) as sock:
        assert server.server is not None
        blocks = server.server.exports["disk"]
        server.call(lambda: blocks.map.set(0, bytes([LOST]) * 4))
        with caplog.at_level(logging.ERROR, logger="ramster.node"):
            for _ in range(50):  # a client reading them in a loop
                assert answer(sock, Command.READ, 0, length=4096)[0] is Error.EIO
            logged = [r for r in caplog.records if r.getMessage() == "nbd_read_lost"]
            assert len(logged) == 1  # the rest within the second
            later = blocks.lost_log.last - LOG_SECONDS  # as if a second went by
            server.call(lambda: setattr(blocks.lost_log, "last", later))
            assert answer(sock, Command.READ, 0, length=8192)[0] is Error.EIO
        fields = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "nbd_read_lost"]
        assert [(f["blocks"], f["unlogged"]) for f in fields] == [(1, 0), (2, 49)]


def states(text: str) -> bytes:
    """A map's bytes, a letter each: D(ATA), H(OLE), L(OST)."""
    return bytes({"D": DATA, "H": HOLE, "L": LOST}[c] for c in text)


class CountedMap(BlockMap):
    """An in-memory map that counts its reads and writes."""

    def __init__(self, blocks: int) -> None:
        super().__init__(None, blocks)
        self.gets = self.sets = 0

    def get(self, first: int, stop: int) -> bytes:
        self.gets += 1
        return super().get(first, stop)

    def set(self, first: int, states: bytes) -> None:
        self.sets += 1
        super().set(first, states)


def test_a_write_group_reads_its_span_of_the_map_once_and_leaves_lost_blocks_lost() -> None:
    none = CommandFlag(0)

    def write(block: int, blocks: int, fill: bytes = b"w") -> Request:
        return Write(0, block * 4096, blocks * 4096, none, fill * (blocks * 4096))

    def zeroes(block: int, blocks: int) -> Request:
        return WriteZeroes(0, block * 4096, blocks * 4096, none)

    with ServerThread([Export("disk", 1 * MiB)]) as server:
        assert server.server is not None
        blocks: ExportBlocks = server.server.exports["disk"]
        counted = CountedMap(blocks.map.blocks)
        server.call(lambda: setattr(blocks, "map", counted))

        def run(*requests: Request) -> list[Error]:
            counted.gets = counted.sets = 0
            group = Group(WRITE, list(requests))
            future = asyncio.run_coroutine_threadsafe(blocks.run(group), server.loop)
            return [error for _, error, _ in future.result(timeout=30)]

        group = (write(0, 4), zeroes(4, 2), write(6, 2), write(10, 3))
        assert run(*group) == [Error.OK] * 4
        assert counted.get(0, 14) == states("DDDDHHDDHHDDDH")
        # a rewrite of the same data as data and of the zeroes as zeroes: one read, no write
        assert run(*group) == [Error.OK] * 4
        assert (counted.gets, counted.sets) == (1, 0)
        # a block in the span the group does not touch is LOST (a crash): it stays LOST, and
        # the blocks the group changes are marked, one range at a time
        server.call(lambda: counted.set(8, bytes([LOST])))
        assert run(zeroes(0, 2), write(4, 2), write(10, 3, b"x")) == [Error.OK] * 3
        assert counted.gets == 1  # the ranges are brought in step from the span's read
        assert counted.get(0, 14) == states("HHDDDDDDLHDDDH")
        assert counted.sets > 0
