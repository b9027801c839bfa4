# What clients can make a node hold: --nbd-max-connections connections at once (more are closed
# as they come), and a deadline on negotiation (a socket that never gets to the transmission
# phase is closed), so neither a flood of connections nor idle sockets pin the node's memory or
# its slots.  Against a node process with real clients (nbdinfo), and raw sockets for the rest.
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.nbd import connection
from ramster.nbd import Export
from ramster.nbd import server as server_machine
from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    GREETING,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    U32,
    Command,
    Error,
    Option,
    OptionReply,
    info_request,
    option_reply,
    option_request,
)
from tests.nbd.conftest import MiB, ServerThread, nbd_node, need, node_exits, run
from tests.nbd.test_batching import negotiate
from tests.nbd.test_clients import recv_exactly
from tests.nbd.test_node import nbd_port


def greeted(port: int, source: str = "127.0.0.1") -> socket.socket | None:
    """A new connection (from address `source`) if the server greets it, None if it closes it
    unserved."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    try:
        if len(recv_exactly(sock, GREETING.size)) == GREETING.size:
            return sock
    except ConnectionError:  # reset: the server aborted it
        pass
    sock.close()
    return None


def dropped(metrics_port: int | None, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    name, labels = "ramster_nbd_connections_dropped_total", {"reason": reason}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


@pytest.fixture
def quick_deadline(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    monkeypatch.setattr(connection, "NEGOTIATION_SECONDS", 0.5)
    yield 0.5


def test_connections_past_the_limit_are_closed_and_the_slots_come_back() -> None:
    need("nbdinfo")
    with nbd_node("--nbd-export", "disk:8Mi", "--nbd-max-connections", "4") as node:
        port = nbd_port(node)
        held = [greeted(port, f"127.0.0.{1 + i}") for i in range(4)]  # each its own source
        assert all(held)
        assert greeted(port, "127.0.0.5") is None and greeted(port, "127.0.0.6") is None
        busy = subprocess.run(  # from 127.0.0.1, whose one slot is held
            ["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], capture_output=True, timeout=60
        )
        assert busy.returncode != 0
        assert dropped(node.metrics_port, "limit") == 3
        for sock in held:
            assert sock is not None
            sock.close()
        deadline = time.monotonic() + 30  # the node sees the closes, then serves again
        while (sock := greeted(port)) is None:
            assert time.monotonic() < deadline
        sock.close()
        assert b"disk" in run("nbdinfo", "--list", f"nbd://127.0.0.1:{port}")
        assert node.running
        assert '"event": "nbd_connection_dropped"' in node.log()


def test_a_connection_not_through_negotiation_in_time_is_closed(quick_deadline: float) -> None:
    with ServerThread([Export("disk", MiB)]) as server:
        silent = greeted(server.port)  # says nothing after the greeting
        assert silent is not None
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server
        assert quick_deadline * 0.8 < time.monotonic() - started < 20
        labels = {"reason": "negotiation_timeout"}
        got = server.registry.get_sample_value("ramster_nbd_connections_dropped_total", labels)
        assert got == 1
        assert server.call(lambda: len(server.server.connections)) == 0  # type: ignore[union-attr]


def reads(sock: socket.socket, handle: int) -> bool:
    """Whether a served connection still answers a READ (of a never-written block)."""
    try:
        sock.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, handle, 0, 4096))
        reply = recv_exactly(sock, SIMPLE_REPLY_HEADER.size)
    except ConnectionError:  # reset: the server aborted it
        return False
    if len(reply) < SIMPLE_REPLY_HEADER.size:
        return False
    _, error, got = SIMPLE_REPLY_HEADER.unpack(reply)
    return (error, got) == (0, handle) and recv_exactly(sock, 4096) == bytes(4096)


def test_a_negotiated_connection_outlives_the_deadline(quick_deadline: float) -> None:
    with ServerThread([Export("disk", MiB)]) as server, negotiate(server) as sock:
        time.sleep(quick_deadline * 3)
        assert reads(sock, 9)


def test_served_connections_go_on_whatever_comes_after_them() -> None:
    """Past the limit, a connection that negotiates is closed; a flood of connections that never
    negotiate fills the negotiation slots only: the connections already served go on."""
    with ServerThread([Export("disk", MiB)], max_connections=2) as server:
        served = [negotiate(server), negotiate(server)]
        late = greeted(server.port)  # over the limit only once it negotiates: GO is refused
        assert late is not None
        late.sendall(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
        late.sendall(option_request(Option.GO, info_request("disk", ())))
        with contextlib.suppress(ConnectionError):  # a reset, or the end after no reply
            assert late.recv(OPTION_REPLY_HEADER.size) == b""
        idle = [greeted(server.port, "127.0.0.2"), greeted(server.port, "127.0.0.3")]
        assert all(idle) and greeted(server.port, "127.0.0.4") is None
        assert all(reads(sock, 1 + i) for i, sock in enumerate(served))
        get = server.registry.get_sample_value
        assert get("ramster_nbd_connections_dropped_total", {"reason": "limit"}) == 2
        for sock in [*served, *idle, late]:
            assert sock is not None
            sock.close()


def test_one_source_negotiates_a_quarter_of_the_slots() -> None:
    """A flood from one address takes a quarter of the negotiation slots, so other addresses
    still get in; the source's slots come back as its connections close or negotiate."""
    with ServerThread([Export("disk", MiB)], max_connections=8) as server:
        mine = [greeted(server.port), greeted(server.port)]
        assert all(mine) and greeted(server.port) is None  # 8 // 4 from 127.0.0.1
        others = [greeted(server.port, a) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.2")]
        assert all(others)
        get = server.registry.get_sample_value
        assert get("ramster_nbd_connections_dropped_total", {"reason": "source_limit"}) == 1
        closed = mine.pop()
        assert closed is not None
        closed.close()
        deadline = time.monotonic() + 30  # the node sees the close, then greets again
        while server.call(lambda: server.server.negotiating["127.0.0.1"]) != 1:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        served = negotiate(server)  # through negotiation: no longer counted against its source
        assert reads(served, 1)
        again = greeted(server.port)
        assert again is not None
        assert server.call(lambda: dict(server.server.negotiating)) == {  # type: ignore[union-attr]
            "127.0.0.1": 2,
            "127.0.0.2": 2,
            "127.0.0.3": 1,
        }
        for sock in [*mine, *others, served, again]:
            assert sock is not None
            sock.close()


class Peer:
    """What source_of() reads of a transport."""

    def __init__(self, peername: object) -> None:
        self.peername = peername

    def get_extra_info(self, name: str) -> object:
        return self.peername if name == "peername" else None


def test_sources_are_ipv4_addresses_ipv6_prefixes_and_unix_users() -> None:
    source_of = connection.source_of
    assert source_of(Peer(("192.0.2.7", 5000))) == "192.0.2.7"  # type: ignore[arg-type]
    a = source_of(Peer(("2001:db8:1:2:aaaa::1", 5000, 0, 0)))  # type: ignore[arg-type]
    b = source_of(Peer(("2001:db8:1:2:bbbb::9", 6000, 0, 0)))  # type: ignore[arg-type]
    assert a == b == "2001:db8:1:2::/64"
    assert source_of(Peer(("2001:db8:1:3::1", 1, 0, 0))) != a  # type: ignore[arg-type]
    assert source_of(Peer(("::ffff:192.0.2.7", 1, 0, 0))) == "192.0.2.7"  # type: ignore[arg-type]
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:

        class UnixPeer(Peer):
            def get_extra_info(self, name: str) -> object:
                return left if name == "socket" else ""

        assert source_of(UnixPeer(None)) == f"uid {os.getuid()}"  # type: ignore[arg-type]


def test_the_limit_is_a_checked_setting(tmp_path: Path) -> None:
    export = ("--nbd-listen", "127.0.0.1:0", "--nbd-export", "a:1Mi")
    for value in ("0", "-1", "many"):
        done = node_exits(tmp_path, *export, "--nbd-max-connections", value)
        assert done.returncode == 2 and "--nbd-max-connections" in done.stderr


def flooded(sock: socket.socket, blob: bytes, most: int) -> int:
    """Send `blob` over and over without reading a reply until the server stops taking it
    (no progress for 2 s) or `most` bytes went: the bytes sent."""
    sock.setblocking(False)
    sent, stuck_since = 0, None
    while sent < most:
        try:
            sent += sock.send(blob[sent % len(blob) :])
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 2:
                break
            time.sleep(0.05)
    sock.settimeout(30)
    return sent


def read_into(sock: socket.socket, size: int, out: list[bytes]) -> None:
    """Read `size` bytes (or what comes before the server closes) into `out`, in big reads."""
    got = bytearray()
    while len(got) < size and (chunk := sock.recv(min(size - len(got), 1 << 20))):
        got += chunk
    out.append(bytes(got))


@pytest.mark.parametrize("flood", ["flush", "rejected", "list"])
def test_a_client_that_never_reads_its_replies_is_held_up_by_tcp(
    flood: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests served by the task (FLUSH), requests the machine rejects itself (READ past the
    end) and options while negotiating (LIST), pipelined by a client that reads nothing: the
    node stops reading once its bounded backlog is full, and answers every one once the client
    reads."""
    monkeypatch.setattr(connection, "NEGOTIATION_SECONDS", 120)  # the LIST flood is slow to read
    with ServerThread([Export("disk", MiB)]) as server:
        if flood == "list":
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            recv_exactly(sock, GREETING.size)
            sock.sendall(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
            one = option_request(Option.LIST)
        else:
            sock = negotiate(server)
            offset = 0 if flood == "flush" else 2 * MiB
            length = 0 if flood == "flush" else 4096
            command = Command.FLUSH if flood == "flush" else Command.READ
            one = REQUEST_HEADER.pack(REQUEST_MAGIC, 0, command, 1, offset, length)
        sent = flooded(sock, one * 4096, 160 * MiB)
        assert sent < 128 * MiB, "the node kept reading a client that reads nothing"

        def held() -> list[tuple[int, int, int]]:
            assert server.server is not None
            return [
                (len(c.conn._events), c.conn.buffered, c.transport.get_write_buffer_size())
                for c in server.server.connections
                if c.transport is not None
            ]

        ((events, buffered, unsent),) = server.call(held)
        assert events <= server_machine.EVENTS_HIGH
        assert buffered <= connection.INPUT_HIGH + server_machine.CHUNK
        assert unsent <= connection.OUTPUT_HIGH + 2 * server_machine.OUTPUT_HIGH
        # one reply for each request, the same each time: for LIST the export's SERVER reply
        # and an ACK, else a simple reply (handle 1) that says OK to FLUSH and EINVAL otherwise
        if flood == "list":
            unit = option_reply(Option.LIST, OptionReply.SERVER, U32.pack(4) + b"disk")
            unit += option_reply(Option.LIST, OptionReply.ACK)
        else:
            error = Error.OK if flood == "flush" else Error.EINVAL
            unit = SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, 1)
        want, got = -(-sent // len(one)), []
        reader = threading.Thread(target=read_into, args=(sock, want * len(unit), got))
        reader.start()
        if sent % len(one):  # the rest of the last request
            sock.sendall(one[sent % len(one) :])
        reader.join(120)
        assert got == [unit * want]  # every request answered, in order
        if flood == "list":  # and the connection goes on
            sock.sendall(option_request(Option.GO, info_request("disk", ())))
            _, _, kind, length = OPTION_REPLY_HEADER.unpack(recv_exactly(sock, 20))
            assert kind in (1, 3)  # INFO or ACK: served
        else:
            sock.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.READ, 9, 0, 4096))
            assert SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))[1:] == (0, 9)
        sock.close()
