# The connection's direct send (NbdConnection._send_now): whatever the socket takes, the rest it
# hands back must be exactly the bytes not sent, in order, whatever the parts' types and sizes.
from __future__ import annotations

import os
import socket

import pytest

from node.nbd.connection import IOV_MAX, NbdConnection


def _received(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def _parts(count: int, total: int) -> list[bytes | memoryview]:
    """`count` parts of about total/count random bytes, bytes and views by turns, an empty one
    first (the machine's own bytes, usually none)."""
    size = max(total // count, 16)
    parts: list[bytes | memoryview] = [b""]
    for n in range(count):
        data = os.urandom(size + n % 7)
        parts.append(memoryview(bytearray(data)) if n % 2 else data)
    return parts


@pytest.mark.parametrize("count", [1, 3, 40, IOV_MAX + 7])
def test_a_partial_send_hands_back_exactly_the_unsent_bytes(count: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # far less than the parts
        a.setblocking(False)
        parts = _parts(count, 4 << 20)
        whole = b"".join(parts)
        rest = NbdConnection._send_now(a, parts)
        sent = _received(b)
        assert 0 < len(sent) < len(whole)  # the socket took some, not all
        assert sent + b"".join(rest) == whole


class _Takes:
    """A socket that takes exactly `n` bytes of a sendmsg: every cut, edges of parts included."""

    def __init__(self, n: int) -> None:
        self.n = n

    def sendmsg(self, parts: list[bytes | memoryview]) -> int:
        return self.n


def test_every_cut_point_leaves_the_rest_in_order() -> None:
    parts = _parts(5, 40)
    whole = b"".join(parts)
    for cut in range(len(whole) + 1):
        rest = NbdConnection._send_now(_Takes(cut), parts)  # type: ignore[arg-type]
        assert whole[:cut] + b"".join(rest) == whole, cut


def test_a_send_the_socket_takes_whole_leaves_nothing() -> None:
    a, b = socket.socketpair()
    with a, b:
        parts: list[bytes | memoryview] = [b"header", memoryview(b"x" * 100), b""]
        assert NbdConnection._send_now(a, parts) == []
        assert _received(b) == b"headerxxxxxxxxxx" + b"x" * 90


def test_a_send_that_fails_leaves_every_part_to_the_transport() -> None:
    a, b = socket.socketpair()
    b.close()
    with a:
        parts: list[bytes | memoryview] = [b"reply"]
        assert NbdConnection._send_now(a, parts) == parts
