# The NBD server machine against generated client streams: handshakes, options and requests,
# well formed or not (random magics, commands, flags, offsets, lengths, option data, garbage),
# cut at random points.  A TCP stream may be split anywhere, so whatever the cuts, the input
# chunk size and the backlog at which parsing waits for the shell, the machine must see the same
# messages: the same events, the same bytes of its own to send, the same end.
# And whatever the bytes, it never raises, never emits after Closed, and every request it emits
# can be answered once.  STARTTLS is refused by policy here (no TLS configured): with TLS the
# machine must tell bytes sent before its ACK from bytes sent after, which is cut-dependent by
# design (tests/nbd/test_protocol.py covers that injection case).
from __future__ import annotations

from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.nbd import (
    NEED_DATA,
    Closed,
    Error,
    Export,
    Negotiated,
    ProtocolMisuse,
    Read,
    Rejected,
    Reply,
    Request,
    ServerConnection,
    Write,
    server,
)
from ramster.nbd.wire import (
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    Command,
    Info,
    Option,
    info_request,
    meta_request,
    option_request,
)

EXPORTS = [Export("disk", 1 << 20, "a test disk"), Export("other", 8192)]
U16 = st.integers(0, (1 << 16) - 1)
U32 = st.integers(0, (1 << 32) - 1)
NAMES = st.sampled_from(["disk", "other", "", "nope", "x" * 300])


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` four times in five, else `odd` (a stream cut short by its first oddity would
    rarely reach the requests)."""
    return st.sampled_from((usual, usual, usual, usual, odd)).flatmap(lambda chosen: chosen)


client_flags = mostly(st.sampled_from([1, 3]), U32).map(CLIENT_FLAGS.pack)

option_data = st.one_of(
    st.builds(
        info_request,
        NAMES,
        st.lists(st.sampled_from(list(Info)), max_size=4).map(tuple),
    ),
    st.builds(
        meta_request,
        NAMES,
        st.lists(st.sampled_from(["base:allocation", "base:", "qemu:dirty", ""]), max_size=3),
    ),
    st.binary(max_size=64),
)
HAGGLING = [o for o in Option if o not in (Option.GO, Option.EXPORT_NAME, Option.ABORT)]
options = mostly(  # mostly options that leave the haggling going (the stream's GO ends it)
    st.builds(option_request, st.sampled_from(HAGGLING), option_data),
    st.builds(  # any option, any magic, a length that may disagree with the data
        lambda magic, option, length, data: OPTION_HEADER.pack(magic, option, length) + data,
        st.sampled_from([IHAVEOPT, IHAVEOPT, IHAVEOPT ^ 1]),
        U32,
        st.one_of(st.integers(0, 80), U32),
        st.binary(max_size=80),
    ),
)
go = st.just(
    option_request(Option.STRUCTURED_REPLY)
    + option_request(Option.SET_META_CONTEXT, meta_request("disk", ["base:allocation"]))
    + option_request(Option.GO, info_request("disk", (Info.BLOCK_SIZE,)))
)


SERVING = [c for c in Command if c != Command.DISC]  # mostly commands that keep it going


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    command = draw(mostly(st.sampled_from(SERVING), U16))
    offset = draw(mostly(st.integers(0, (1 << 20) - 20_000), st.integers(0, (1 << 64) - 1)))
    length = draw(mostly(st.integers(0, 20_000), U32))
    magic = draw(st.sampled_from([REQUEST_MAGIC] * 19 + [REQUEST_MAGIC ^ 4]))
    flags = draw(mostly(st.just(0), st.one_of(st.sampled_from([1, 2, 4, 8, 16]), U16)))
    handle = draw(st.integers(0, (1 << 64) - 1))
    header = REQUEST_HEADER.pack(magic, flags, command, handle, offset, length)
    if command != Command.WRITE:
        return header
    # a write's payload: whole, short (the stream runs on into the next message) or none
    sent: int = draw(mostly(st.just(length), st.sampled_from([max(0, length - 1), 0])))
    return header + bytes([draw(st.integers(0, 255))]) * min(sent, 20_000)


streams = st.builds(
    lambda flags, opts, gone, reqs, tail: b"".join([flags, *opts, gone, *reqs, tail]),
    client_flags,
    st.lists(options, max_size=3),
    mostly(go, st.just(b"")),
    st.lists(requests(), max_size=8),
    st.one_of(st.just(b""), st.binary(max_size=40)),
)


def summary(event: Any) -> tuple[Any, ...]:
    """What an event says, comparable across connections."""
    if isinstance(event, Write):
        return ("Write", event.handle, event.offset, event.length, event.flags, bytes(event.data))
    if isinstance(event, Request):
        return (type(event).__name__, event.handle, event.offset, event.length, event.flags)
    if isinstance(event, Rejected):
        return ("Rejected", event.handle, event.command, event.error)
    if isinstance(event, Closed):
        return ("Closed", event.violation)
    if isinstance(event, Negotiated):
        return ("Negotiated", event.export.name)
    raise AssertionError(f"unexpected event {event!r}")


def serve(
    stream: bytes,
    cuts: list[int],
    hang_up: bool,
    chunk: int = server.CHUNK,
    backlog: tuple[int, int] = (server.EVENTS_HIGH, server.OUTPUT_HIGH),
) -> tuple[list[tuple[Any, ...]], bytes]:
    """Feed `stream` cut at `cuts`, taking and answering events after each piece, into input
    chunks of `chunk` bytes (smaller ones than the machine's cross more chunk edges), parsing
    held back at `backlog` (events, bytes of output) as a shell sees it: the events and every
    byte the machine produced itself."""
    with (
        patch.object(server, "CHUNK", chunk),
        patch.object(server, "MIN_RECV", min(server.MIN_RECV, chunk // 4)),
        patch.object(server, "EVENTS_HIGH", backlog[0]),
        patch.object(server, "OUTPUT_HIGH", backlog[1]),
    ):
        return _serve(ServerConnection(EXPORTS), stream, cuts, hang_up)


def _serve(
    conn: ServerConnection, stream: bytes, cuts: list[int], hang_up: bool
) -> tuple[list[tuple[Any, ...]], bytes]:
    seen: list[tuple[Any, ...]] = []
    lent: list[tuple[bytes | memoryview, bytes]] = []
    out = bytearray()
    closed = False
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces = [piece for piece in pieces if piece]  # b"" says the client closed its side
    for piece in [*pieces, b""] if hang_up else pieces:
        conn.receive_data(piece)
        held = True
        while held:  # until no complete message waits behind output not taken
            while (event := conn.next_event()) is not NEED_DATA:
                assert not closed, f"{event!r} after the connection closed"
                seen.append(summary(event))
                closed = isinstance(event, Closed)
                if isinstance(event, Write):
                    assert len(event.data) == event.length
                    lent.append((event.data, bytes(event.data)))
                if isinstance(event, Request):
                    answer(conn, event)
            assert conn.buffered >= 0
            held = conn.held_back
            out += conn.data_to_send()
    for view, was in lent:  # a payload is a view of the input, which is never written again
        assert view == was
    return seen, bytes(out)


def answer(conn: ServerConnection, request: Request) -> None:
    """Answer once (a Read with its data when it is small, anything else with an error);
    a second answer is refused."""
    if isinstance(request, Read) and request.length <= 20_000:
        reply = Reply(request, data=bytes(request.length))
    else:
        reply = Reply(request, Error.EIO)
    assert conn.send(reply)
    try:
        conn.send(reply)
    except ProtocolMisuse:
        return
    raise AssertionError(f"{request!r} was answered twice")


@settings(max_examples=300, deadline=None)
@given(
    streams,
    st.lists(st.integers(0, 1 << 20), max_size=12),
    st.booleans(),
    st.sampled_from([server.CHUNK, 256, 4096, 9000]),
    st.sampled_from([(server.EVENTS_HIGH, server.OUTPUT_HIGH), (1, 1), (2, 40), (3, 300)]),
)
def test_any_cut_of_any_client_stream_gives_the_same_events_and_replies(
    stream: bytes, cuts: list[int], hang_up: bool, chunk: int, backlog: tuple[int, int]
) -> None:
    whole = serve(stream, [], hang_up)
    cut = serve(stream, sorted({c % (len(stream) + 1) for c in cuts}), hang_up, chunk, backlog)
    assert cut == whole


@settings(max_examples=100, deadline=None)
@given(streams)
def test_a_stream_fed_a_byte_at_a_time_gives_the_same_events_and_replies(stream: bytes) -> None:
    stream = stream[:3000]
    assert serve(stream, list(range(1, len(stream))), True, 256, (1, 1)) == serve(stream, [], True)
