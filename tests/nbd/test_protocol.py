# The NBD server machine in memory: the lister client against it, then hostile byte sequences
# fed directly (wrong magic, unknown flags, oversized options and requests, ranges past the end,
# a client gone mid-write), each of which must end in a clean NBD error or a close.
from __future__ import annotations

import mmap
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.nbd import (
    HOLE_BLOCK,
    NEED_DATA,
    BlockStatus,
    Closed,
    Error,
    Event,
    Export,
    ExportLister,
    Flush,
    NbdError,
    Negotiated,
    ProtocolMisuse,
    Read,
    Rejected,
    Reply,
    ServerConnection,
    StartTls,
    TransmissionFlag,
    Write,
    WriteZeroes,
)
from ramster.nbd.server import (
    ALLOCATION_ID,
    CHUNK,
    EVENTS_HIGH,
    OUTPUT_HIGH,
    SPARE_CHUNKS,
    new_chunk,
)
from ramster.nbd.wire import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_PAD,
    EXTENT,
    FLAG_FIXED_NEWSTYLE,
    GREETING,
    HOLE_CHUNK,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    U32,
    Command,
    CommandFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
    info_request,
    meta_request,
    option_reply,
    option_request,
)

EXPORTS = [Export("disk", 1 << 20, "a test disk"), Export("other", 8192)]


def events(conn: ServerConnection) -> list[Event]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        out.append(event)
    return out


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply in data."""
    out = []
    while data:
        _, option, reply, length = OPTION_REPLY_HEADER.unpack_from(data)
        end = OPTION_REPLY_HEADER.size + length
        out.append((option, reply, data[OPTION_REPLY_HEADER.size : end]))
        data = data[end:]
    return out


def go(conn: ServerConnection) -> None:
    conn.receive_data(option_request(Option.GO, info_request("disk", (Info.BLOCK_SIZE,))))
    assert [type(e) for e in events(conn)] == [Negotiated]
    conn.data_to_send()


def handshake(conn: ServerConnection) -> None:
    """Client flags and GO: the connection is in transmission, nothing left to send."""
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    go(conn)


def request(
    command: int, offset: int = 0, length: int = 0, handle: int = 7, flags: int = 0
) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def simple_reply(data: bytes) -> tuple[int, int]:
    _, error, handle = SIMPLE_REPLY_HEADER.unpack_from(data)
    return error, handle


def test_lister_reads_names_sizes_and_block_sizes() -> None:
    conn, lister = ServerConnection(EXPORTS), ExportLister()
    seen: list[Event] = []
    while not lister.done:
        lister.receive_data(conn.data_to_send())
        conn.receive_data(lister.data_to_send())
        seen += events(conn)
    assert len(seen) == 1 and isinstance(seen[0], Closed) and not seen[0].violation
    got = [(e.name, e.size, e.description, e.block_sizes, e.error) for e in lister.exports]
    assert got == [
        ("disk", 1 << 20, "a test disk", (1, 4096, 32 << 20), ""),
        ("other", 8192, "", (1, 4096, 32 << 20), ""),
    ]
    assert [e.contexts for e in lister.exports] == [[BASE_ALLOCATION], [BASE_ALLOCATION]]


def test_lister_takes_a_refused_context_listing_as_no_contexts() -> None:
    """A server without metadata contexts answers LIST_META_CONTEXT with an error: the export
    is listed all the same, with none."""
    conn, lister = ServerConnection(EXPORTS), ExportLister()
    lister.receive_data(conn.data_to_send()[: GREETING.size])
    while not lister.done:
        conn.receive_data(lister.data_to_send())
        sent, replies = conn.data_to_send(), b""
        while sent:  # the server's replies, those about contexts made one ERR_UNSUP
            _, option, _, length = OPTION_REPLY_HEADER.unpack_from(sent)
            end = OPTION_REPLY_HEADER.size + length
            if option != Option.LIST_META_CONTEXT:
                replies += sent[:end]
            elif end == len(sent):  # its last reply (the ACK)
                replies += option_reply(option, OptionReply.ERR_UNSUP)
            sent = sent[end:]
        lister.receive_data(replies)
    assert [(e.name, e.error, e.contexts) for e in lister.exports] == [
        ("disk", "", []),
        ("other", "", []),
    ]


REPLIES = st.lists(
    st.tuples(
        st.sampled_from([*Option, 0, 0xFFFFFFFF]),
        st.sampled_from([*OptionReply, 0x80000099]),
        st.binary(max_size=48),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(REPLIES, st.booleans())
def test_whatever_a_server_replies_the_lister_lists_or_says_what_was_wrong(
    replies: list[tuple[int, int, bytes]], hang_up: bool
) -> None:
    """A hostile or broken server (short or malformed names, information and contexts, replies
    to options never sent): the lister ends with its exports or an NbdError, nothing else."""
    lister = ExportLister()
    lister.receive_data(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE))
    try:
        for option, reply, data in replies:
            lister.receive_data(option_reply(option, reply, data))  # type: ignore[arg-type]
        if hang_up:
            lister.receive_data(b"")
    except NbdError:
        return
    assert all(isinstance(e.name, str) and isinstance(e.contexts, list) for e in lister.exports)


def test_the_lister_refuses_a_huge_reply_before_it_arrives() -> None:
    lister = ExportLister()
    lister.receive_data(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE))
    header = OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, Option.LIST, OptionReply.SERVER, 1 << 31)
    with pytest.raises(NbdError, match="an option reply of 2147483648 bytes"):
        lister.receive_data(header)


def test_go_to_an_unknown_export_is_an_error_reply_and_haggling_goes_on() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.GO, info_request("nope", ())))
    assert events(conn) == []
    replies = option_replies(conn.data_to_send()[GREETING.size :])
    assert [(o, r) for o, r, _ in replies] == [(Option.GO, OptionReply.ERR_UNKNOWN)]
    conn.receive_data(option_request(Option.GO, info_request("", ())))  # the default export
    (negotiated,) = events(conn)
    assert isinstance(negotiated, Negotiated) and negotiated.export.name == "disk"


@pytest.mark.parametrize(
    ("option", "data", "expected"),
    [
        (Option.STARTTLS, b"", OptionReply.ERR_POLICY),
        (Option.STRUCTURED_REPLY, b"x", OptionReply.ERR_INVALID),
        (Option.EXTENDED_HEADERS, b"", OptionReply.ERR_UNSUP),
        (Option.SET_META_CONTEXT, meta_request("disk", [BASE_ALLOCATION]), OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, meta_request("nope", []), OptionReply.ERR_UNKNOWN),
        (Option.LIST_META_CONTEXT, meta_request("disk", ["no-colon"]), OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, meta_request("disk", ["base:"])[:-1], OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, meta_request("disk", [])[:5], OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, b"\x00\x00\x00\x00\xff\xff\xff\xff", OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, meta_request("disk", []) + b"x", OptionReply.ERR_INVALID),
        (Option.LIST_META_CONTEXT, bytes(70000), OptionReply.ERR_TOO_BIG),
        (Option.LIST, b"junk", OptionReply.ERR_INVALID),
        (Option.INFO, b"\x00\x00\x00\x09ab", OptionReply.ERR_INVALID),  # name longer than data
        (Option.INFO, info_request("disk", ()) + b"x", OptionReply.ERR_INVALID),
        (Option.INFO, b"\x00\x00\x00\x02\xff\xfe\x00\x00", OptionReply.ERR_INVALID),  # not UTF-8
        (Option.GO, bytes(9000), OptionReply.ERR_TOO_BIG),
        (1234, b"whatever", OptionReply.ERR_UNSUP),
    ],
)
def test_bad_options_get_error_replies(option: int, data: bytes, expected: OptionReply) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(option, data))  # type: ignore[arg-type]
    assert events(conn) == []
    assert [r for _, r, _ in option_replies(conn.data_to_send()[GREETING.size :])] == [expected]
    go(conn)  # and the connection still works


@pytest.mark.parametrize(
    "bytes_in",
    [
        CLIENT_FLAGS.pack(0x80),  # an unknown client flag
        CLIENT_FLAGS.pack(1) + b"IHAVEOPX" + bytes(8),  # wrong option magic
        CLIENT_FLAGS.pack(1) + option_request(Option.EXPORT_NAME, b"nope"),  # unknown, no error
        CLIENT_FLAGS.pack(1) + option_request(Option.EXPORT_NAME, bytes(70000)),
    ],
)
def test_unrecoverable_handshakes_close_the_connection(bytes_in: bytes) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(bytes_in)
    (closed,) = events(conn)
    assert isinstance(closed, Closed) and closed.violation


def test_export_name_answers_with_size_and_flags_and_padding() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.EXPORT_NAME, b"other"))
    (negotiated,) = events(conn)
    assert isinstance(negotiated, Negotiated)
    reply = conn.data_to_send()[GREETING.size :]
    assert reply[:8] == (8192).to_bytes(8, "big") and len(reply) == 10 + EXPORT_NAME_PAD


def test_requests_become_events_and_replies_are_encoded() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    payload = bytes(range(256)) * 20
    conn.receive_data(request(Command.WRITE, 10, len(payload), handle=1) + payload[:1000])
    assert events(conn) == []  # a write waits for its whole payload
    conn.receive_data(payload[1000:] + request(Command.READ, 10, 5120, handle=2))
    write, read = events(conn)
    assert isinstance(write, Write) and write.data == payload and write.offset == 10
    assert isinstance(read, Read) and read.handle == 2
    assert conn.send(Reply(write)) == [SIMPLE_REPLY_HEADER.pack(0x67446698, 0, 1)]
    header, data = conn.send(Reply(read, data=payload))
    assert simple_reply(bytes(header)) == (0, 2) and data == payload
    with pytest.raises(ProtocolMisuse):
        conn.send(Reply(read, data=payload))  # answered already


def test_a_read_reply_must_carry_exactly_the_length_asked() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(request(Command.READ, 0, 4096))
    (read,) = events(conn)
    assert isinstance(read, Read)
    with pytest.raises(ProtocolMisuse):
        conn.send(Reply(read, data=bytes(4095)))
    assert len(conn.send(Reply(read, Error.EIO))) == 1  # an error carries no data


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (request(Command.READ, (1 << 20) - 10, 11), Error.EINVAL),  # past the end
        (request(Command.READ, 0, (32 << 20) + 1), Error.EINVAL),  # over the maximum
        (request(Command.READ, 1 << 63, 1), Error.EINVAL),
        (request(Command.TRIM, 4096, 1 << 20), Error.EINVAL),
        (request(Command.WRITE_ZEROES, 4096, 1 << 20), Error.ENOSPC),
        (request(Command.FLUSH, 0, 4096), Error.EINVAL),
        (request(Command.READ, 0, 4096, flags=CommandFlag.NO_HOLE), Error.EINVAL),
        (request(Command.CACHE, 0, 4096), Error.EINVAL),
        (request(Command.BLOCK_STATUS, 0, 4096), Error.EINVAL),
        (request(99, 0, 0), Error.EINVAL),
    ],
)
def test_bad_requests_are_rejected_by_the_machine(header: bytes, error: Error) -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(header + request(Command.READ, 0, 4096, handle=8))
    rejected, read = events(conn)
    assert isinstance(rejected, Rejected) and rejected.error is error
    assert simple_reply(conn.data_to_send()) == (error, 7)
    assert isinstance(read, Read) and read.handle == 8  # the connection goes on


@pytest.mark.parametrize(
    ("offset", "length", "error"),
    [((1 << 20) - 100, 200, Error.ENOSPC), (0, (32 << 20) + 4096, Error.EINVAL)],
)
def test_a_bad_write_swallows_its_payload_then_fails(
    offset: int, length: int, error: Error
) -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(request(Command.WRITE, offset, length))
    for sent in range(0, length, 1 << 20):  # the payload arrives in pieces and is not kept
        assert events(conn) == []
        conn.receive_data(bytes(min(1 << 20, length - sent)))
        assert conn.buffered <= 1 << 20
    conn.receive_data(request(Command.FLUSH, handle=9))
    got = events(conn)
    assert [type(e).__name__ for e in got] == ["Rejected", "Flush"]
    assert simple_reply(conn.data_to_send()) == (error, 7)


def test_write_payloads_are_views_of_the_input_which_is_never_written_again() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    writes: list[Write] = []
    for n in range(600):  # ~2.4 MiB: several input chunks, payloads across their edges
        payload = bytes([n % 251]) * 4096
        conn.receive_data(request(Command.WRITE, 0, 4096, handle=n) + payload)
        (write,) = events(conn)
        assert isinstance(write, Write) and isinstance(write.data, memoryview)
        writes.append(write)
    assert [w.handle for w in writes] == list(range(600))
    for n, write in enumerate(writes):  # every view still holds what it was given
        assert write.data == bytes([n % 251]) * 4096, n


def test_power_of_two_payloads_fill_a_chunk_whole() -> None:
    """Four 256 KiB writes (nbdcopy's size) and their headers fit one input chunk: no payload
    straddles its end, to be copied into the next."""
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    size = 256 * 1024
    for n in range(4):
        conn.receive_data(request(Command.WRITE, n * size, size, handle=n) + bytes([n]) * size)
    writes = events(conn)
    assert [type(w) for w in writes] == [Write] * 4
    chunks = {id(cast(memoryview, w.data).obj) for w in writes if isinstance(w, Write)}
    assert len(chunks) == 1


def test_input_chunks_are_reused_once_no_payload_view_of_them_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = []

    def counted(size: int) -> mmap.mmap:
        made.append(size)
        return new_chunk(size)

    monkeypatch.setattr("ramster.nbd.server.new_chunk", counted)
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    kept = []
    for n in range(2 * 2048):  # 16 MiB: the first half's payloads are kept, the second's not
        payload = bytes([n % 251]) * 4096
        conn.receive_data(request(Command.WRITE, 0, 4096, handle=n) + payload)
        (write,) = events(conn)
        assert isinstance(write, Write) and write.data == payload
        if n < 2048:
            kept.append(write)
        else:
            conn.send_to([], write, Error.OK, ())  # answered: the machine lets go of it
        if n == 2048:
            chunks_while_kept = len(made)
    assert chunks_while_kept >= 8  # a view of each chunk is alive: none is reused
    assert len(made) - chunks_while_kept <= SPARE_CHUNKS + 2  # then the spares go round
    for n, write in enumerate(kept):  # what was lent was never written over
        assert write.data == bytes([n % 251]) * 4096, n


def test_more_spare_chunks_on_request_and_none_once_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shell that holds more input at once keeps more chunks for reuse; drop_spares() lets
    them all go, and the next chunks are new."""
    made = []

    def counted(size: int) -> mmap.mmap:
        made.append(size)
        return new_chunk(size)

    monkeypatch.setattr("ramster.nbd.server.new_chunk", counted)
    conn = ServerConnection(EXPORTS, spare_chunks=3 * SPARE_CHUNKS)

    def burst(first: int) -> None:
        """Writes of 3 * SPARE_CHUNKS MiB, all held until each is answered at the end."""
        held = []
        for n in range(first, first + 3 * SPARE_CHUNKS * 256):
            conn.receive_data(request(Command.WRITE, 0, 4096, handle=n) + bytes(4096))
            held += events(conn)
        for write in held:
            assert isinstance(write, Write)
            conn.send_to([], write, Error.OK, ())

    handshake(conn)
    burst(0)
    fresh = len(made)
    burst(10**6)
    assert len(made) - fresh <= 2  # the second burst went round the spares
    conn.drop_spares()
    again = len(made)
    burst(2 * 10**6)
    assert len(made) - again >= 3 * SPARE_CHUNKS - 1  # nothing kept: new chunks


def test_parsing_waits_while_events_or_replies_are_not_taken() -> None:
    """A client's backlog stays bytes in the input (counted in `buffered`, which the shell
    pauses reading on), not events or replies: parsing goes on as they are taken."""
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    flushes = b"".join(request(Command.FLUSH, handle=h) for h in range(3 * EVENTS_HIGH))
    conn.receive_data(flushes)
    assert len(conn._events) == EVENTS_HIGH and conn.held_back
    assert conn.buffered == len(flushes) - EVENTS_HIGH * REQUEST_HEADER.size
    assert [e.handle for e in events(conn) if isinstance(e, Flush)] == list(range(3 * EVENTS_HIGH))
    assert conn.buffered == 0 and not conn.held_back

    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.data_to_send()
    conn.receive_data(option_request(Option.LIST) * 5000)  # ~48 bytes of replies each
    assert events(conn) == [] and conn.held_back
    replies = [conn.data_to_send()]
    while conn.held_back:  # a shell: take the output, then parse on
        assert OUTPUT_HIGH <= len(replies[-1]) < OUTPUT_HIGH + 100
        assert events(conn) == []
        replies.append(conn.data_to_send())
    acks = [r for r in option_replies(b"".join(replies)) if r[1] == OptionReply.ACK]
    assert len(acks) == 5000 and conn.buffered == 0


def test_input_after_the_end_is_dropped() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(b"\xff" * REQUEST_HEADER.size)  # a bad magic: the connection is over
    assert [type(e).__name__ for e in events(conn)] == ["Closed"]
    for _ in range(8):
        conn.receive_data(bytes(1 << 20))
        assert conn.buffered <= CHUNK  # dropped, but for what one chunk holds


def test_write_zeroes_takes_its_flags() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    flags = CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO | CommandFlag.FUA
    conn.receive_data(request(Command.WRITE_ZEROES, 0, 1 << 20, flags=flags))
    (zero,) = events(conn)
    assert isinstance(zero, WriteZeroes) and zero.flags == flags


@pytest.mark.parametrize(
    ("tail", "violation"),
    [
        (request(Command.DISC), False),
        (b"", False),  # hung up between requests
        (request(Command.WRITE, 0, 4096) + bytes(100), True),  # hung up mid-write
        (request(Command.READ)[:10], True),
        (b"\x00" * 28, True),  # wrong request magic
    ],
)
def test_ends_of_a_connection(tail: bytes, violation: bool) -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(tail)
    conn.receive_data(b"")
    (closed,) = events(conn)
    assert isinstance(closed, Closed) and closed.violation is violation
    conn.receive_data(request(Command.READ))
    assert events(conn) == []  # nothing after the end


# -- TLS (FORCEDTLS): the machine's side of STARTTLS ------------------------------------------
def tls_conn() -> ServerConnection:
    conn = ServerConnection(EXPORTS, tls_required=True)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.data_to_send()  # the greeting
    return conn


def start_tls(conn: ServerConnection) -> None:
    conn.receive_data(option_request(Option.STARTTLS))
    assert [type(e) for e in events(conn)] == [StartTls]
    assert [r for _, r, _ in option_replies(conn.data_to_send())] == [OptionReply.ACK]
    conn.tls_started()


@pytest.mark.parametrize(
    "option",
    [Option.LIST, Option.INFO, Option.GO, Option.STRUCTURED_REPLY, 1234],
)
def test_before_starttls_every_option_but_abort_needs_tls(option: int) -> None:
    conn = tls_conn()
    data = info_request("disk", ()) if option in (Option.INFO, Option.GO) else b""
    conn.receive_data(option_request(option, data))  # type: ignore[arg-type]
    assert events(conn) == []
    assert [r for _, r, _ in option_replies(conn.data_to_send())] == [OptionReply.ERR_TLS_REQD]
    start_tls(conn)  # and the client may still upgrade
    go(conn)


def test_starttls_then_haggling_starts_over_inside_tls() -> None:
    conn = tls_conn()
    start_tls(conn)
    conn.receive_data(option_request(Option.STARTTLS))  # once is enough
    assert events(conn) == []
    assert [r for _, r, _ in option_replies(conn.data_to_send())] == [OptionReply.ERR_INVALID]
    go(conn)
    conn.receive_data(request(Command.READ, 0, 4096))
    assert [type(e) for e in events(conn)] == [Read]


def test_without_tls_configured_starttls_is_refused_by_policy() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.STARTTLS))
    assert events(conn) == []
    replies = option_replies(conn.data_to_send()[GREETING.size :])
    assert [r for _, r, _ in replies] == [OptionReply.ERR_POLICY]
    with pytest.raises(ProtocolMisuse):
        conn.tls_started()


def test_starttls_with_data_is_invalid() -> None:
    conn = tls_conn()
    conn.receive_data(option_request(Option.STARTTLS, b"x"))
    assert events(conn) == []
    assert [r for _, r, _ in option_replies(conn.data_to_send())] == [OptionReply.ERR_INVALID]


@pytest.mark.parametrize(
    "bytes_in",
    [
        option_request(Option.EXPORT_NAME, b"disk"),  # no error reply exists: hang up
        option_request(Option.STARTTLS) + option_request(Option.LIST),  # clear text behind it
    ],
)
def test_what_cannot_be_answered_before_tls_closes_the_connection(bytes_in: bytes) -> None:
    conn = tls_conn()
    conn.receive_data(bytes_in)
    (closed,) = events(conn)
    assert isinstance(closed, Closed) and closed.violation
    assert b"disk" not in conn.data_to_send()  # nothing about the exports went out


def test_tls_needs_fixed_newstyle() -> None:
    conn = ServerConnection(EXPORTS, tls_required=True)
    conn.receive_data(CLIENT_FLAGS.pack(0))
    (closed,) = events(conn)
    assert isinstance(closed, Closed) and closed.violation


def test_abort_before_tls_is_acknowledged() -> None:
    conn = tls_conn()
    conn.receive_data(option_request(Option.ABORT))
    (closed,) = events(conn)
    assert isinstance(closed, Closed) and not closed.violation
    assert [r for _, r, _ in option_replies(conn.data_to_send())] == [OptionReply.ACK]


def test_lister_with_tls_upgrades_then_lists() -> None:
    conn, lister = ServerConnection(EXPORTS, tls_required=True), ExportLister(tls=True)
    upgrades, seen = 0, list[Event]()
    while not lister.done:
        lister.receive_data(conn.data_to_send())
        if lister.upgrade:  # what the shells do with their sockets, here in memory
            assert isinstance(seen[-1], StartTls)
            conn.tls_started()
            lister.tls_started()
            upgrades += 1
        conn.receive_data(lister.data_to_send())
        seen += events(conn)
    assert upgrades == 1 and [e.name for e in lister.exports] == ["disk", "other"]


def test_lister_without_tls_is_told_that_tls_is_required() -> None:
    conn, lister = ServerConnection(EXPORTS, tls_required=True), ExportLister()
    lister.receive_data(conn.data_to_send())
    conn.receive_data(lister.data_to_send())
    assert events(conn) == []
    with pytest.raises(NbdError, match="requires TLS"):
        lister.receive_data(conn.data_to_send())


# -- structured replies and base:allocation ------------------------------------------------------
def structured(
    conn: ServerConnection, contexts: list[str] | None = None, name: str = "disk"
) -> int:
    """Client flags, STRUCTURED_REPLY, SET_META_CONTEXT for `name` (with `contexts`, if any)
    and GO to "disk": the transmission flags GO gave."""
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.STRUCTURED_REPLY))
    if contexts is not None:
        conn.receive_data(option_request(Option.SET_META_CONTEXT, meta_request(name, contexts)))
    conn.receive_data(option_request(Option.GO, info_request("disk", ())))
    assert [type(e) for e in events(conn)] == [Negotiated]
    replies = option_replies(conn.data_to_send()[GREETING.size :])
    info = next(p for o, r, p in replies if o == Option.GO and r == OptionReply.INFO)
    _, _, flags = INFO_EXPORT.unpack(info)
    return int(flags)


def send_to(conn: ServerConnection, read: Read, pieces: list[bytes]) -> list[bytes | memoryview]:
    """The parts of a successful read's reply made of `pieces`."""
    parts: list[bytes | memoryview] = []
    conn.send_to(parts, read, Error.OK, pieces)
    return parts


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, handle, payload) of each structured reply chunk in data."""
    out = []
    while data:
        magic, flags, kind, handle, length = CHUNK_HEADER.unpack_from(data)
        assert magic == STRUCTURED_REPLY_MAGIC
        end = CHUNK_HEADER.size + length
        out.append((flags, kind, handle, data[CHUNK_HEADER.size : end]))
        data = data[end:]
    return out


def test_structured_reads_are_one_data_chunk_and_errors_error_chunks() -> None:
    conn = ServerConnection(EXPORTS)
    assert structured(conn) & TransmissionFlag.SEND_DF
    conn.receive_data(request(Command.READ, 10, 5000, handle=1, flags=CommandFlag.DF))
    conn.receive_data(request(Command.READ, 0, 4096, handle=2))
    conn.receive_data(request(Command.READ, 0, 0, handle=3))
    conn.receive_data(request(Command.FLUSH, handle=4))
    read, failed, empty, flush = events(conn)
    assert isinstance(read, Read) and isinstance(failed, Read) and isinstance(empty, Read)
    assert isinstance(flush, Flush)
    payload = bytes(range(250)) * 20
    got = b"".join(conn.send(Reply(read, data=payload)))
    assert chunks(got) == [
        (REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, 1, (10).to_bytes(8, "big") + payload)
    ]
    got = b"".join(conn.send(Reply(failed, Error.EIO)))
    assert chunks(got) == [(REPLY_FLAG_DONE, ReplyType.ERROR, 2, ERROR_CHUNK.pack(Error.EIO, 0))]
    got = b"".join(conn.send(Reply(empty)))
    assert chunks(got) == [(REPLY_FLAG_DONE, ReplyType.NONE, 3, b"")]
    assert simple_reply(b"".join(conn.send(Reply(flush)))) == (0, 4)  # no payload: simple


def test_structured_rejections_are_error_chunks_with_the_reason() -> None:
    conn = ServerConnection(EXPORTS)
    structured(conn)
    conn.receive_data(request(Command.READ, (1 << 20) - 10, 11, handle=5))
    (rejected,) = events(conn)
    assert isinstance(rejected, Rejected) and rejected.error is Error.EINVAL
    ((flags, kind, handle, payload),) = chunks(conn.data_to_send())
    assert (flags, kind, handle) == (REPLY_FLAG_DONE, ReplyType.ERROR, 5)
    error, size = ERROR_CHUNK.unpack_from(payload)
    assert error == Error.EINVAL and payload[ERROR_CHUNK.size :].decode() == rejected.reason
    assert len(payload) == ERROR_CHUNK.size + size


def test_df_needs_structured_replies() -> None:
    conn = ServerConnection(EXPORTS)
    handshake(conn)
    conn.receive_data(request(Command.READ, 0, 4096, flags=CommandFlag.DF))
    (rejected,) = events(conn)
    assert isinstance(rejected, Rejected) and simple_reply(conn.data_to_send()) == (Error.EINVAL, 7)


@pytest.mark.parametrize(
    ("queries", "listed"),
    [([], [BASE_ALLOCATION]), (["base:"], [BASE_ALLOCATION]), (["qemu:dirty-bitmap:b"], [])],
)
def test_list_meta_context(queries: list[str], listed: list[str]) -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.LIST_META_CONTEXT, meta_request("disk", queries)))
    replies = option_replies(conn.data_to_send()[GREETING.size :])
    contexts = [p for _, r, p in replies if r == OptionReply.META_CONTEXT]
    assert [c[4:].decode() for c in contexts] == listed and all(c[:4] == bytes(4) for c in contexts)
    assert replies[-1][1] == OptionReply.ACK


@pytest.mark.parametrize(
    ("contexts", "name", "live"),
    [
        ([BASE_ALLOCATION], "disk", True),
        (["base:", "x-other:thing", BASE_ALLOCATION], "", True),  # "" is the default: disk
        (["base:"], "disk", False),  # SET ignores the wildcard
        ([], "disk", False),
        ([BASE_ALLOCATION], "other", False),  # set for another export than GO chose
        (None, "disk", False),
    ],
)
def test_block_status_needs_base_allocation_set_for_the_export(
    contexts: list[str] | None, name: str, live: bool
) -> None:
    conn = ServerConnection(EXPORTS)
    structured(conn, contexts, name)
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 8192, handle=6))
    (event,) = events(conn)
    if not live:
        assert isinstance(event, Rejected) and event.error is Error.EINVAL
        return
    assert isinstance(event, BlockStatus)
    descriptors = EXTENT.pack(4096, STATE_HOLE | STATE_ZERO) + EXTENT.pack(4096, 0)
    got = b"".join(conn.send(Reply(event, data=descriptors)))
    payload = U32.pack(ALLOCATION_ID) + descriptors
    assert chunks(got) == [(REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, 6, payload)]


def test_set_meta_context_replies_with_the_context_id() -> None:
    conn = ServerConnection(EXPORTS)
    conn.receive_data(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    conn.receive_data(option_request(Option.STRUCTURED_REPLY))
    conn.receive_data(
        option_request(Option.SET_META_CONTEXT, meta_request("disk", ["base:allocation"]))
    )
    replies = option_replies(conn.data_to_send()[GREETING.size :])
    assert [r for _, r, _ in replies] == [
        OptionReply.ACK,
        OptionReply.META_CONTEXT,
        OptionReply.ACK,
    ]
    assert replies[1][2] == U32.pack(ALLOCATION_ID) + BASE_ALLOCATION.encode()
    # a failed SET forgets the earlier one
    conn.receive_data(
        option_request(Option.SET_META_CONTEXT, meta_request("nope", [BASE_ALLOCATION]))
    )
    conn.receive_data(option_request(Option.GO, info_request("disk", ())))
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 4096))
    negotiated, rejected = events(conn)
    assert isinstance(negotiated, Negotiated) and isinstance(rejected, Rejected)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (request(Command.BLOCK_STATUS, 0, 0), "of no bytes"),
        (request(Command.BLOCK_STATUS, 1 << 20, 1), "beyond the end"),
        (request(Command.BLOCK_STATUS, 0, 4096, flags=CommandFlag.DF), "not valid"),
    ],
)
def test_bad_block_status_requests_are_rejected(header: bytes, reason: str) -> None:
    conn = ServerConnection(EXPORTS)
    structured(conn, [BASE_ALLOCATION])
    conn.receive_data(header)
    (rejected,) = events(conn)
    assert isinstance(rejected, Rejected) and reason in rejected.reason


def test_block_status_replies_are_checked() -> None:
    conn = ServerConnection(EXPORTS)
    structured(conn, [BASE_ALLOCATION])
    conn.receive_data(request(Command.BLOCK_STATUS, 0, 4096, flags=CommandFlag.REQ_ONE))
    (status,) = events(conn)
    assert isinstance(status, BlockStatus)
    for wrong in (b"", EXTENT.pack(4096, 0)[:7], EXTENT.pack(8192, 0), EXTENT.pack(4096, 0) * 2):
        with pytest.raises(ProtocolMisuse):  # none, torn, longer than asked, two under REQ_ONE
            conn.send(Reply(status, data=wrong))
    assert conn.send(Reply(status, data=EXTENT.pack(4096, 0)))


def test_inside_tls_a_client_haggles_over_the_exports_it_may_use() -> None:
    conn = tls_conn()
    conn.receive_data(option_request(Option.STARTTLS))
    assert [type(e) for e in events(conn)] == [StartTls]
    conn.data_to_send()
    conn.tls_started([EXPORTS[1]])  # "other" only
    conn.receive_data(option_request(Option.LIST))
    conn.receive_data(option_request(Option.INFO, info_request("disk", ())))
    conn.receive_data(option_request(Option.LIST_META_CONTEXT, meta_request("disk", [])))
    replies = option_replies(conn.data_to_send())
    names = [p[4:].decode() for o, r, p in replies if r == OptionReply.SERVER]
    assert names == ["other"]
    assert [r for o, r, _ in replies if o != Option.LIST] == [OptionReply.ERR_UNKNOWN] * 2
    conn.receive_data(option_request(Option.GO, info_request("", ())))  # the default: its own
    (negotiated,) = events(conn)
    assert isinstance(negotiated, Negotiated) and negotiated.export.name == "other"


def test_structured_reads_send_runs_of_hole_blocks_as_holes() -> None:
    conn = ServerConnection(EXPORTS)
    structured(conn)
    conn.receive_data(request(Command.READ, 4096, 4 * 4096, handle=1))
    conn.receive_data(request(Command.READ, 4096, 2 * 4096, handle=2, flags=CommandFlag.DF))
    conn.receive_data(request(Command.READ, 4096, 2 * 4096, handle=3))
    read, whole, empty = events(conn)
    assert isinstance(read, Read) and isinstance(whole, Read) and isinstance(empty, Read)
    page = bytes(range(256)) * 16
    got = b"".join(send_to(conn, read, [page, HOLE_BLOCK, HOLE_BLOCK, page]))
    offset = (4096).to_bytes(8, "big")
    assert chunks(got) == [
        (0, ReplyType.OFFSET_DATA, 1, offset + page),
        (0, ReplyType.OFFSET_HOLE, 1, HOLE_CHUNK.pack(2 * 4096, 2 * 4096)),
        (REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, 1, (4 * 4096).to_bytes(8, "big") + page),
    ]
    got = b"".join(send_to(conn, whole, [page, HOLE_BLOCK]))  # DF: one data chunk
    assert chunks(got) == [(REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, 2, offset + page + HOLE_BLOCK)]
    got = b"".join(send_to(conn, empty, [HOLE_BLOCK, HOLE_BLOCK]))
    assert chunks(got) == [(REPLY_FLAG_DONE, ReplyType.OFFSET_HOLE, 3, HOLE_CHUNK.pack(4096, 8192))]
