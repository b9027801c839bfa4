# Structured replies and base:allocation against clients nobody here wrote: libnbd (through
# nbdsh) asks BLOCK_STATUS with and without REQ_ONE and reads with DF, nbdinfo --map and
# qemu-img map draw an export's map, nbdcopy copies only the data out of an export with holes,
# and reads get its holes as hole chunks.
from __future__ import annotations

import ast
import json
import socket
from pathlib import Path

import pytest

from node.nbd import blocks
from ramster.nbd.wire import (
    CHUNK_HEADER,
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    U32,
    Command,
    Option,
    OptionReply,
    ReplyType,
    info_request,
    option_request,
)
from tests.nbd.conftest import MiB, ServerThread, need, run
from tests.nbd.test_clients import NBDSH, assert_serving, connect, need_libnbd, recv_exactly

B = 4096
HOLE, DATA = STATE_HOLE | STATE_ZERO, 0  # the extents' kinds here

# blocks 0..24 after the script below: (first block, stop block, flags)
LAYOUT = [
    (0, 4, DATA),
    (4, 8, HOLE),  # trimmed
    (8, 10, DATA),
    (10, 13, HOLE),  # zeroed
    (13, 16, DATA),
    (16, 20, HOLE),  # a page of zeros written as data (16: nothing is kept), never written
    (20, 21, DATA),  # 100 bytes, unaligned
]
WRITE_SCRIPT = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
h.pwrite(bytes(range(256)) * 16 * 16, 0)  # blocks 0..15
h.pwrite(bytes(4096), 16 * 4096)
h.trim(4 * 4096, 4 * 4096)
h.zero(3 * 4096, 10 * 4096)
h.pwrite(b"x" * 100, 20 * 4096 + 10)
h.shutdown()
"""
STATUS_SCRIPT = """
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_structured_replies_negotiated() and h.can_meta_context("base:allocation")
assert h.can_df()
got = []
def collect(context, offset, entries, error):
    got.append((context, offset, list(entries)))
    return 0
h.block_status(SIZE, 0, collect)
h.block_status(8 * 4096, 4 * 4096 + 10, collect, nbd.CMD_FLAG_REQ_ONE)
h.block_status(1, 16 * 4096, collect, nbd.CMD_FLAG_REQ_ONE)
chunks = []
def chunk(data, offset, status, error):
    chunks.append((len(data), offset, status))
    return 0
data = h.pread_structured(4096 - 5, 3 * 4096 + 7, chunk, nbd.CMD_FLAG_DF)
assert data == (bytes(range(256)) * 16)[7:] + bytes(2), data[:16]
print(repr((got, chunks)))
h.shutdown()
"""


def layout_extents(size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of the layout, the rest of the export a hole."""
    out = [(first * B, (stop - first) * B, flags) for first, stop, flags in LAYOUT]
    out.append((21 * B, size - 21 * B, HOLE))
    return out


def write_layout(server: ServerThread, export: str) -> None:
    need_libnbd()
    run(*NBDSH, "-c", f"URI = {server.uri(export)!r}\n" + WRITE_SCRIPT)


def test_block_status_and_structured_reads_through_libnbd(nbd_server: ServerThread) -> None:
    write_layout(nbd_server, "small")
    script = f"URI = {nbd_server.uri('small')!r}\nSIZE = {MiB}\n" + STATUS_SCRIPT
    got, chunks = ast.literal_eval(run(*NBDSH, "-c", script).decode())
    whole, one, zero_page = got
    pairs = [(length, flags) for _, length, flags in layout_extents(MiB)]
    assert whole == ("base:allocation", 0, [n for pair in pairs for n in pair])
    assert one == ("base:allocation", 4 * B + 10, [4 * B - 10, HOLE])  # REQ_ONE: one extent
    assert zero_page == ("base:allocation", 16 * B, [1, HOLE])  # never longer than asked
    assert chunks == [(B - 5, 3 * B + 7, 1)]  # DF: the read is one data chunk (status 1: ok)


def test_nbdinfo_and_qemu_img_map_an_export(nbd_server: ServerThread) -> None:
    need("nbdinfo", "qemu-img")
    write_layout(nbd_server, "small")
    mapped = json.loads(run("nbdinfo", "--map", "--json", nbd_server.uri("small")))
    got = [(e["offset"], e["length"], e["type"]) for e in mapped]
    assert got == layout_extents(MiB)
    qemu = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", nbd_server.uri("small")))
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in qemu] == [
        (offset, length, not flags & STATE_HOLE, bool(flags & STATE_ZERO))
        for offset, length, flags in got
    ]


def test_a_reply_covers_at_most_status_blocks_and_clients_go_on(
    nbd_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("nbdinfo")
    write_layout(nbd_server, "small")
    monkeypatch.setattr(blocks, "STATUS_BLOCKS", 3)  # the server runs in this process
    mapped = json.loads(run("nbdinfo", "--map", "--json", nbd_server.uri("small")))
    merged: list[tuple[int, int, int]] = []
    for e in mapped:  # nbdinfo asked again from where each reply ended; join what it split
        if merged and merged[-1][2] == e["type"]:
            offset, length, flags = merged.pop()
            merged.append((offset, length + e["length"], flags))
        else:
            merged.append((e["offset"], e["length"], e["type"]))
    assert merged == layout_extents(MiB)


def test_nbdcopy_reads_only_the_data_of_an_export_with_holes(
    nbd_server: ServerThread, tmp_path: Path
) -> None:
    need("nbdcopy")
    write_layout(nbd_server, "disk")
    assert nbd_server.server is not None
    before = nbd_server.server.moved
    out = tmp_path / "out.img"
    run("nbdcopy", nbd_server.uri("disk"), str(out))
    assert out.read_bytes() == layout_bytes(64 * MiB)
    # 64 MiB copied, but only what holds data read: one of nbdcopy's requests (256 KiB)
    assert nbd_server.server.moved - before < MiB


def structured_connection(server: ServerThread, export: str) -> socket.socket:
    """A raw connection that negotiated structured replies and base:allocation, then GO."""
    sock = connect(server)
    name = export.encode()
    query = U32.pack(len(name)) + name + U32.pack(1) + U32.pack(15) + b"base:allocation"
    sock.sendall(
        CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE)
        + option_request(Option.STRUCTURED_REPLY)
        + option_request(Option.SET_META_CONTEXT, query)
        + option_request(Option.GO, info_request(export, ()))
    )
    acks = 0
    while acks < 3:  # STRUCTURED_REPLY, SET_META_CONTEXT and GO each end with an ACK
        _, _, reply, length = OPTION_REPLY_HEADER.unpack(
            recv_exactly(sock, OPTION_REPLY_HEADER.size)
        )
        recv_exactly(sock, length)
        acks += reply == OptionReply.ACK
    return sock


def test_a_flood_of_block_status_does_not_stall_other_connections(
    nbd_server: ServerThread,
) -> None:
    """BLOCK_STATUS awaits nothing else: without a yield per request, one connection's queue of
    them ran to its end before any other connection was served."""
    write_layout(nbd_server, "disk")  # an index object to walk
    flood, other = (
        structured_connection(nbd_server, "disk"),
        structured_connection(nbd_server, "disk"),
    )
    n = 2000
    flood.sendall(
        b"".join(
            REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.BLOCK_STATUS, i, 0, 64 * MiB)
            for i in range(n)
        )
    )
    other.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, 1, 0, B))
    _, _, kind, _, length = CHUNK_HEADER.unpack(recv_exactly(other, CHUNK_HEADER.size))
    labels = {"export": "disk", "command": "block_status", "result": "ok"}
    answered = nbd_server.registry.get_sample_value("ramster_nbd_requests_total", labels) or 0
    assert kind == ReplyType.OFFSET_DATA and length == 8 + B
    assert answered < n  # the read was served while the flood still had maps to answer
    for sock in (flood, other):
        sock.close()
    assert_serving(nbd_server)


HOLES_SCRIPT = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
chunks = []
def chunk(data, offset, status, error):
    chunks.append((offset, len(data), status))
    return 0
data = h.pread_structured(24 * 4096, 0, chunk)
sys.stdout.buffer.write(repr(sorted(chunks)).encode() + b"\\n" + data)
h.shutdown()
"""


def layout_bytes(size: int) -> bytes:
    """What the layout's blocks read as, up to `size` bytes."""
    out = bytearray(size)
    for first, stop, flags in LAYOUT:
        if flags == DATA and first != 20:
            out[first * B : stop * B] = (bytes(range(256)) * 16) * (stop - first)
    out[20 * B + 10 : 20 * B + 110] = b"x" * 100
    return bytes(out)


def test_structured_reads_send_holes_as_holes(nbd_server: ServerThread, tmp_path: Path) -> None:
    """A read's blocks that hold nothing come as OFFSET_HOLE chunks (libnbd reports status 2,
    NBD_READ_HOLE, and fills in zeros); so does the zero page written as data."""
    need("nbdcopy")
    write_layout(nbd_server, "small")
    out = run(*NBDSH, "-c", f"import sys\nURI = {nbd_server.uri('small')!r}\n" + HOLES_SCRIPT)
    listed, data = out.split(b"\n", 1)
    kinds = {DATA: 1, HOLE: 2}  # libnbd's NBD_READ_DATA, NBD_READ_HOLE
    runs = [(f * B, (s - f) * B, kinds[flags]) for f, s, flags in LAYOUT]
    assert ast.literal_eval(listed.decode()) == [*runs, (21 * B, 3 * B, 2)]
    assert data == layout_bytes(24 * B)
    copy = tmp_path / "copy.img"  # nbdcopy reading every block, holes come as holes
    run("nbdcopy", "--no-extents", nbd_server.uri("small"), str(copy))
    assert copy.read_bytes() == layout_bytes(MiB)
