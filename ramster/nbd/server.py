# The server side of an NBD connection as a sans-IO state machine: bytes in, events out, replies
# encoded by it (h11's shape).  The I/O shell (node/nbd/) reads into get_buffer() and calls
# buffer_updated() (or hands bytes to receive_data()), takes events from next_event() until
# NEED_DATA, carries out each Request and answers it through send_to() (or send()), and writes
# whatever data_to_send() returns.  Nothing here blocks, reads a clock or
# touches a socket, so every hostile byte sequence can be tested in memory.
#
# Phases (State): the greeting is queued at construction (fixed newstyle, NO_ZEROES offered);
# CLIENT_FLAGS takes the client's 32 bits (unknown bits: hard disconnect, as the spec demands);
# OPTION_HEADER/OPTION_DATA haggle: LIST, INFO, GO, ABORT, the old EXPORT_NAME, STRUCTURED_REPLY
# and LIST/SET_META_CONTEXT are answered here, every other option (EXTENDED_HEADERS) gets
# ERR_UNSUP.  GO or EXPORT_NAME moves to REQUEST_HEADER/WRITE_DATA (transmission).  DISCARD
# swallows a payload the machine will not keep (an oversized option or write) without buffering
# it, then sends the error it earned.  Anything that cannot be resynchronised (a wrong magic)
# closes the connection: there is no way to find the next message boundary.
#
# TLS (the spec's FORCEDTLS mode, with tls_required): until STARTTLS, every option but STARTTLS
# and ABORT gets ERR_TLS_REQD, and EXPORT_NAME (which has no error reply) a hang-up.  STARTTLS is
# acknowledged and surfaces as a StartTls event; the machine then waits (TLS_HANDSHAKE) until the
# shell has upgraded the transport and calls tls_started(), and haggling starts over inside TLS.
# A client that sent bytes after STARTTLS without waiting for the ACK is hung up on: those bytes
# arrived in clear text and must not be taken for the start of the TLS session (the STARTTLS
# injection attack).  Without tls_required, STARTTLS gets ERR_POLICY; once TLS is up, ERR_INVALID.
#
# Structured replies (once the client asked for them): a READ is answered with one OFFSET_DATA
# chunk of its whole length, or one ERROR chunk; where the shell passed HOLE_BLOCK (the very
# object) for blocks that hold nothing, each run of them goes as an OFFSET_HOLE chunk instead (32
# bytes, however long the run), unless the client set DF ("don't fragment": one data chunk;
# SEND_DF is advertised).  Other successes stay simple replies, which the spec allows, and every
# error is an ERROR chunk carrying the reason where the machine has one.  One metadata context,
# base:allocation (SET_META_CONTEXT needs structured replies first; LIST answers either way), is
# live in transmission only if it was set for the export GO then chose, as the spec requires;
# BLOCK_STATUS without it is EINVAL.  The shell answers a BlockStatus with its extents' packed
# descriptors (wire.EXTENT), and the machine frames them for the context.  (Under TLS no option
# but STARTTLS is taken before it, so nothing negotiated in clear text needs forgetting.)
#
# Requests are checked here, before the shell sees them: flags against the command, offset and
# length against the export size, READ/WRITE length against the advertised maximum (32 MiB, the
# portable limit).  A failing request is answered by the machine and surfaces as Rejected.  Block
# sizes advertised: minimum 1 (the shell does unaligned writes by read-modify-write), preferred
# 4096, maximum 32 MiB.  TRIM and WRITE_ZEROES carry no payload, so they may span any part of
# the export.  Replies may go out in any order (NBD matches them by handle); each Request must be
# answered exactly once, and a successful Read carries exactly its length in data.
#
# Input buffering, built for asyncio's BufferedProtocol: the shell asks get_buffer() where the
# next bytes go, the socket is read straight into it, and buffer_updated() parses every complete
# message at once (events queue until next_event() takes them).  The buffer is a chunk of
# CHUNK bytes filled front to back and never written twice: a WRITE's payload is handed to the
# shell as a memoryview of the chunk it arrived in, so payload bytes are copied only when the
# engine takes them.  A chunk whose free tail is shorter than MIN_RECV, or than what the message
# being received still needs, is left behind for a new one (at least as big as that message, up
# to the 32 MiB maximum); the part of the message already received moves over (at most one
# recv's worth, as messages are parsed as soon as they are complete).  A chunk lives as long as
# a view of it, so memory is what is received and not yet served, which the shell bounds by
# pausing the socket (`buffered`).  Chunks are anonymous mmaps, outside the malloc heap: the
# node keeps freed heap memory (ramster/wire.py's keep_freed_memory), and 1 MiB buffers freed
# there after a burst of writes on 4 connections kept ~13 MiB of RSS for good; an mmap goes
# back to the OS with its last view.  A chunk no payload was lent from is reused from its
# start; the last `spare_chunks` lent ones (SPARE_CHUNKS unless the shell, which knows how much
# input it holds at once, says more) are kept and reused once no view of them is left (mmap's
# resize refuses while one is), so a connection faults its chunks in once, not per MiB (a
# fault costs ~1.4 us per 4 KiB, the zeroing of a new bytearray ~0.2 us).  Trade-off: a
# connection holds up to spare_chunks + 1 MiB of input buffers while traffic flows, until the
# shell calls drop_spares().  Request
# headers, the bulk of the traffic of 4 KiB I/O, are parsed in place (no copy, no enum
# construction: commands and flags are looked up in tables).  Replies are appended to the
# shell's list of parts for one gathered send (send_to), a read's pages as they are, uncopied.
#
# Backlog: parsing stops, between messages, once EVENTS_HIGH events wait for next_event() or
# OUTPUT_HIGH bytes of the machine's own replies wait for data_to_send(), and goes on when
# they are taken (`held_back` says so: the shell takes the output, and once its socket drains
# calls next_event() again).  The bytes not parsed count in `buffered`, so a shell that pauses
# reading on it bounds what a client makes the connection hold.  Parsing everything at once,
# a client that pipelined 4 KiB READs and never read a reply grew the node by 840 MB in 8 s
# (163 MB of requests, a Read event each), parsing a receive of them whole held the loop up to
# 340 ms (another connection's reads waited that long), and a client that sent NBD_OPT_LIST
# without end, before any authentication, grew the node by 25 MB/s of queued replies.
from __future__ import annotations

import enum
import mmap
from collections import deque
from collections.abc import Sequence
from itertools import groupby, repeat
from operator import is_

from ramster.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Closed,
    Event,
    Export,
    Flush,
    Negotiated,
    Read,
    Rejected,
    Reply,
    Request,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
    _NeedData,
)
from ramster.nbd.wire import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAG_NO_ZEROES,
    CLIENT_FLAGS,
    DATA_CHUNK_HEADER,
    ERROR_CHUNK,
    EXPORT_NAME_PAD,
    EXPORT_NAME_REPLY,
    EXTENT,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    HOLE_CHUNK,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    KNOWN_CLIENT_FLAGS,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEADER,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    Command,
    CommandFlag,
    Error,
    Info,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
    option_reply,
)

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE: the spec's portable limit, 2**25
MAX_OPTION_DATA = 4 + MAX_STRING + 2 + 2 * 64  # GO with the longest name and 64 info requests
MAX_META_DATA = 64 * 1024  # LIST/SET_META_CONTEXT: the longest name and a few queries
ALLOCATION_ID = 1  # the id of base:allocation once SET_META_CONTEXT selected it
OFFSET_DATA_SIZE = DATA_CHUNK_HEADER.size - CHUNK_HEADER.size  # an OFFSET_DATA chunk's offset
HOLE_BLOCK = bytes(PREFERRED_BLOCK)  # a read's block that holds nothing (see the header)
# input buffer: bytes per chunk, 1 MiB of payloads and room for the headers of their requests
# (146 of them), so that power-of-two payloads (nbdcopy's 256 KiB, the kernel's) fill a chunk
# whole: at 1 MiB even, every fourth 256 KiB payload straddled the end and moved to the next
# chunk, a copy of a quarter of all bytes written (3% of python-app's sequential writes)
CHUNK = (1 << 20) + 4096
MIN_RECV = 64 << 10  # a shorter free tail is left behind for a new chunk
EVENTS_HIGH = 1024  # events not taken by next_event() at which parsing waits (see the header)
OUTPUT_HIGH = 16 << 10  # bytes of the machine's own output not taken at which it waits too
SPARE_CHUNKS = 4  # lent chunks kept for reuse
TRANSMISSION_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.CAN_MULTI_CONN  # no cache per connection: every reply is in the engine
)
# Flags each command may carry (FUA is valid on all once SEND_FUA is advertised), as plain ints.
ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: int(CommandFlag.FUA),
    Command.WRITE: int(CommandFlag.FUA),
    Command.DISC: int(CommandFlag.FUA),
    Command.FLUSH: int(CommandFlag.FUA),
    Command.TRIM: int(CommandFlag.FUA),
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.FUA | CommandFlag.REQ_ONE),
}
# ... and those a command may carry once structured replies are negotiated
STRUCTURED_FLAGS: dict[int, int] = {Command.READ: int(CommandFlag.DF)}
REQUEST_TYPES: dict[int, type[Request]] = {
    Command.READ: Read,
    Command.FLUSH: Flush,
    Command.TRIM: Trim,
    Command.WRITE_ZEROES: WriteZeroes,
    Command.BLOCK_STATUS: BlockStatus,
}
COMMANDS = {int(c): c for c in Command}
_READ, _WRITE, _DISC, _FLUSH, _WRITE_ZEROES, _BLOCK_STATUS = (  # plain ints for the checks
    int(Command.READ),
    int(Command.WRITE),
    int(Command.DISC),
    int(Command.FLUSH),
    int(Command.WRITE_ZEROES),
    int(Command.BLOCK_STATUS),
)
assert _READ < _WRITE < _FLUSH  # READ and WRITE are the commands <= _WRITE
FLAGS = {f: CommandFlag(f) for f in range(int(max(CommandFlag)) * 2)}  # every valid combination
META_OPTIONS = (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT)
assert MAX_PAYLOAD % PREFERRED_BLOCK == 0 and PREFERRED_BLOCK & (PREFERRED_BLOCK - 1) == 0
assert set(REQUEST_TYPES) | {Command.WRITE, Command.DISC} == set(ALLOWED_FLAGS)


class State(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    TLS_HANDSHAKE = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_DATA = enum.auto()
    REQUEST_HEADER = enum.auto()
    WRITE_DATA = enum.auto()
    DISCARD = enum.auto()
    CLOSED = enum.auto()


# The states the per-message paths test, as module names: on Python 3.11 a class attribute of an
# Enum goes through EnumType.__getattr__'s hook (~175 ns, ten times a global's), and _parse met
# several per request.
_REQUEST_HEADER, _WRITE_DATA, _DISCARD = State.REQUEST_HEADER, State.WRITE_DATA, State.DISCARD
_CLOSED, _TLS_HANDSHAKE, _OK = State.CLOSED, State.TLS_HANDSHAKE, Error.OK
_DF = int(CommandFlag.DF)  # an IntFlag operation costs ~1.5 us


class ProtocolMisuse(Exception):
    """The shell broke the contract (a second reply to a request, a read of the wrong size)."""


def new_chunk(size: int) -> mmap.mmap:
    """An input chunk: zeroed memory of its own, outside the heap (see the header)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


class ServerConnection:
    """One client connection; see the header for the phases."""

    def __init__(
        self,
        exports: Sequence[Export],
        tls_required: bool = False,
        spare_chunks: int = SPARE_CHUNKS,
    ) -> None:
        self.exports = {e.name: e for e in exports}
        self.tls_required = tls_required
        self.tls = False  # the transport speaks TLS (after STARTTLS and tls_started())
        self.default = exports[0] if exports else None  # what the empty name selects
        self.export: Export | None = None  # chosen by GO / EXPORT_NAME
        self.structured = False  # the client negotiated structured replies
        self.allocation = False  # base:allocation is live (BLOCK_STATUS may be sent)
        self._meta: Export | None = None  # the export SET_META_CONTEXT selected it for
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self._want = CLIENT_FLAGS.size  # bytes the current state needs
        self._buf = new_chunk(CHUNK)  # the input chunk: bytes [_pos, _end) are unparsed
        self._spare: deque[mmap.mmap] = deque()  # lent chunks, reused once no view is left
        self._spares = spare_chunks  # ... at most this many
        self._pos = 0
        self._end = 0
        self._lent = False  # a payload view of this chunk went out: never write it again
        self._queued = 0  # payload bytes of queued Write events
        self._eof = False
        self._out = bytearray(
            GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self._events: deque[Event] = deque()
        self._held = False  # parsing stopped at the backlog limits (see the header)
        self._option = 0  # the option whose data is being read
        self._request: tuple[int, int, int, int] = (0, 0, 0, 0)  # flags, handle, offset, length
        self._after_discard: Event | None = None
        self._outstanding: set[Request] = set()

    # -- the shell's interface ----------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (then call buffer_updated with their count)."""
        free = len(self._buf) - self._end
        if free < MIN_RECV or free < self._want - (self._end - self._pos):
            self._new_chunk()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, n: int) -> None:
        """`n` bytes arrived in the buffer get_buffer() gave; complete messages become events."""
        self._end += n
        self._parse()

    def drop_spares(self) -> None:
        """Forget the lent chunks kept for reuse (each goes back to the OS with its last view):
        the shell calls it when traffic has paused, so an idle connection holds one chunk."""
        self._spare.clear()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (copied in); b"" means the client closed its side."""
        if not data:
            self._eof = True
            self._parse()
        with memoryview(data) as rest:
            while rest:
                buffer = self.get_buffer()
                n = min(len(buffer), len(rest))
                buffer[:n] = rest[:n]
                rest = rest[n:]
                self.buffer_updated(n)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA when the buffered bytes hold no complete message (or
        parsing is held back by output not taken: held_back)."""
        if not self._events:
            self._parse()  # bytes may have waited for tls_started()
            if not self._events:
                return NEED_DATA
        event = self._events.popleft()
        if type(event) is Write:
            self._queued -= event.length
        return event

    def tls_started(self, exports: Sequence[Export] | None = None) -> None:
        """The shell upgraded the transport after StartTls: haggling goes on inside TLS, over
        `exports` if given (those the client's certificate may use: the others are unknown to
        it, in LIST, INFO, GO and the rest), else all.  Bytes received since StartTls must have
        come through the TLS session (the shell upgrades before it reads again; the session
        may deliver the client's first option before this call)."""
        if self.state is not State.TLS_HANDSHAKE:
            raise ProtocolMisuse("tls_started() without a StartTls event")
        if exports is not None:
            self.exports = {e.name: e for e in exports}
            self.default = exports[0] if exports else None
        self.tls = True
        self._expect(State.OPTION_HEADER, OPTION_HEADER.size)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken: unparsed, or payloads of queued writes."""
        return self._end - self._pos + self._queued

    @property
    def held_back(self) -> bool:
        """Parsing stopped at EVENTS_HIGH events or OUTPUT_HIGH bytes of output not taken:
        complete messages may wait in the input.  Take data_to_send() (and the events), then
        call next_event() again."""
        return self._held

    @property
    def wanted(self) -> int:
        """Bytes the machine needs buffered before it can go on (a whole write payload, say)."""
        return self._want

    def data_to_send(self) -> bytes:
        """Bytes the machine produced itself (greeting, option replies, rejections)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, reply: Reply) -> list[bytes | memoryview]:
        """Encode the reply to a request next_event() returned (header, then any read data)."""
        parts: list[bytes | memoryview] = []
        self.send_to(parts, reply.request, reply.error, (reply.data,) if reply.data else ())
        return parts

    def send_to(
        self,
        parts: list[bytes | memoryview],
        request: Request,
        error: Error = Error.OK,
        data: Sequence[bytes | memoryview] = (),
    ) -> None:
        """Append the reply to a request next_event() returned to `parts` (for one gathered send):
        the header, then the pieces of `data` (not copied here): for a successful Read exactly
        its length in all, for a successful BlockStatus its extents' descriptors."""
        if request not in self._outstanding:
            raise ProtocolMisuse(f"no request awaits a reply: {request!r}")
        this = type(request)
        carried = sum(map(len, data)) if data else 0
        if error is not _OK or (this is not Read and this is not BlockStatus):
            expected = carried == 0
        elif this is Read:
            expected = carried == request.length
        else:  # one or more descriptors, each of a nonzero length, none past the request
            expected = carried > 0 and carried % EXTENT.size == 0
            if expected and request.flags & CommandFlag.REQ_ONE:
                (length, _) = EXTENT.unpack(bytes(data[0][: EXTENT.size]))
                expected = carried == EXTENT.size and length <= request.length
        if not expected:
            raise ProtocolMisuse(f"reply carries {carried} bytes for {request!r}")
        self._outstanding.discard(request)
        handle = request.handle
        if error is not _OK:
            parts.append(self._error_reply(handle, error))
        elif this is Read and self.structured:
            if not carried:  # OFFSET_DATA carries at least one byte
                parts.append(chunk_header(handle, ReplyType.NONE, 0))
            elif int(request.flags) & _DF or not any(map(is_, data, repeat(HOLE_BLOCK))):
                parts.append(data_header(handle, request.offset, carried, REPLY_FLAG_DONE))
                parts += data
            else:
                read_chunks(parts, handle, request.offset, data)
        elif this is BlockStatus:
            length = U32.size + carried
            parts.append(chunk_header(handle, ReplyType.BLOCK_STATUS, length))
            parts.append(U32.pack(ALLOCATION_ID))
            parts += data
        else:
            parts.append(SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle))
            parts += data

    def _error_reply(self, handle: int, error: Error, message: str = "") -> bytes:
        """An error reply: an ERROR chunk with the message once structured replies are
        negotiated, else a simple reply."""
        if not self.structured:
            return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle)
        text = message.encode()[:MAX_STRING]
        length = ERROR_CHUNK.size + len(text)
        header = chunk_header(handle, ReplyType.ERROR, length)
        return header + ERROR_CHUNK.pack(error, len(text)) + text

    # -- buffer ---------------------------------------------------------------------------------
    def _new_chunk(self) -> None:
        """Go on in a new chunk (or this one from its start, if nothing was lent from it), big
        enough for the message being received, whose received part moves over."""
        if self.state is State.CLOSED:
            self._pos = self._end  # nothing will be parsed any more: drop it
        have = self._end - self._pos
        size = max(CHUNK, have + MIN_RECV, self._want if self.state is _WRITE_DATA else 0)
        if self._lent or len(self._buf) < size:
            old, self._buf = self._buf, self._reusable(size) or new_chunk(size)
            with memoryview(old) as received:  # one copy (a slice of an mmap is bytes: two)
                self._buf[:have] = received[self._pos : self._end]
            if self._lent and len(old) == CHUNK and self._spares:
                if len(self._spare) == self._spares:
                    self._spare.popleft()  # lent the longest: it goes once its views go
                self._spare.append(old)
        elif have:
            self._buf.move(0, self._pos, have)
        self._pos, self._end, self._lent = 0, have, False

    def _reusable(self, size: int) -> mmap.mmap | None:
        """A spare chunk of no view any more (taken from the spares), if one is big enough."""
        if size > CHUNK:
            return None
        for _ in range(len(self._spare)):  # oldest first: the likeliest to be free
            chunk = self._spare.popleft()
            try:
                chunk.resize(CHUNK)  # its own size: refused while a view of it is left
            except BufferError:
                self._spare.append(chunk)
                continue
            return chunk
        return None

    def _take(self, n: int) -> bytes:
        chunk = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def _on_payload(self) -> None:
        """The whole payload of a write is in: a Write event with a view of it."""
        flags, handle, offset, length = self._request
        data = memoryview(self._buf)[self._pos : self._pos + length]
        self._pos += length
        self._lent = True
        self._queued += length
        self.state, self._want = _REQUEST_HEADER, REQUEST_HEADER.size
        self._emit(Write(handle, offset, length, FLAGS[flags], data))

    def _discard(self) -> None:
        drop = min(self._want, self._end - self._pos)
        self._pos += drop
        self._want -= drop

    def _close(self, reason: str, violation: bool = False) -> None:
        self.state = State.CLOSED
        self._want = 0
        self._events.append(Closed(reason, violation))

    def _hung_up(self) -> None:
        between = self._pos == self._end and self.state in (
            State.OPTION_HEADER,
            State.REQUEST_HEADER,
        )
        if between:
            self._close("client closed the connection")
        else:
            self._close("client closed the connection in the middle of a message", True)

    def _expect(self, state: State, size: int) -> None:
        self.state, self._want = state, size

    def _discard_then(self, size: int, event: Event | None) -> None:
        self._expect(State.DISCARD, size)
        self._after_discard = event

    # -- steps: each consumes exactly the bytes its state wanted ---------------------------------
    def _parse(self) -> None:
        """Every complete message buffered becomes its events (a step per message), up to the
        backlog limits."""
        events, out = self._events, self._out
        self._held = False
        while True:
            if len(events) >= EVENTS_HIGH or len(out) >= OUTPUT_HIGH:
                self._held = True
                return
            state = self.state
            if state is _REQUEST_HEADER and self._end - self._pos >= REQUEST_HEADER.size:
                fields = REQUEST_HEADER.unpack_from(self._buf, self._pos)  # the hot path: in place
                self._pos += REQUEST_HEADER.size
                self._on_request_header(*fields)
                continue
            if state is _CLOSED or state is _TLS_HANDSHAKE:
                return
            if state is _DISCARD:
                self._discard()
                if self._want:
                    if self._eof:
                        self._close("client closed the connection in the middle of a message", True)
                        continue
                    return
                self.state = State.REQUEST_HEADER if self.export else State.OPTION_HEADER
                self._want = REQUEST_HEADER.size if self.export else OPTION_HEADER.size
                if self._after_discard is not None:
                    self._events.append(self._after_discard)
                continue
            if self._end - self._pos < self._want:
                if self._eof:
                    self._hung_up()
                    continue
                return
            if state is _WRITE_DATA:
                self._on_payload()
            else:
                self._step(self._take(self._want))

    def _step(self, chunk: bytes) -> None:
        if self.state is State.CLIENT_FLAGS:
            self._on_client_flags(chunk)
        elif self.state is State.OPTION_HEADER:
            self._on_option_header(chunk)
        else:
            assert self.state is State.OPTION_DATA  # REQUEST_HEADER and WRITE_DATA: _parse
            self._on_option(self._option, chunk)

    def _on_client_flags(self, chunk: bytes) -> None:
        (flags,) = CLIENT_FLAGS.unpack(chunk)
        if flags & ~KNOWN_CLIENT_FLAGS:
            self._close(f"client sent unknown handshake flags {flags:#x}", True)
            return
        if self.tls_required and not flags & CLIENT_FLAG_FIXED_NEWSTYLE:
            self._close("TLS is required, and it needs fixed newstyle negotiation", True)
            return
        self.no_zeroes = bool(flags & CLIENT_FLAG_NO_ZEROES)
        self._expect(State.OPTION_HEADER, OPTION_HEADER.size)

    def _on_option_header(self, chunk: bytes) -> None:
        magic, option, length = OPTION_HEADER.unpack(chunk)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}", True)
        elif length > (MAX_META_DATA if option in META_OPTIONS else MAX_OPTION_DATA):
            if option == Option.EXPORT_NAME:  # cannot be answered with an error
                self._close(f"export name of {length} bytes", True)
                return
            self._out += option_reply(option, OptionReply.ERR_TOO_BIG, b"option data too long")
            self._discard_then(length, None)
        elif length:
            self._option = option
            self._expect(State.OPTION_DATA, length)
        else:
            self._on_option(option, b"")

    def _on_option(self, option: int, data: bytes) -> None:
        self._expect(State.OPTION_HEADER, OPTION_HEADER.size)
        if option == Option.ABORT:
            self._out += option_reply(option, OptionReply.ACK)
            self._close("client aborted the negotiation")
        elif option == Option.STARTTLS:
            self._on_starttls(data)
        elif self.tls_required and not self.tls:
            if option == Option.EXPORT_NAME:  # no error reply exists: the spec says hang up
                self._close("client chose an export without TLS, which is required", True)
                return
            text = b"TLS is required: send NBD_OPT_STARTTLS first"
            self._out += option_reply(option, OptionReply.ERR_TLS_REQD, text)
        elif option == Option.LIST:
            self._on_list(data)
        elif option in (Option.INFO, Option.GO):
            self._on_info(option, data)
        elif option == Option.EXPORT_NAME:
            self._on_export_name(data)
        elif option == Option.STRUCTURED_REPLY:
            self._on_structured_reply(data)
        elif option in META_OPTIONS:
            self._on_meta_context(option, data)
        else:
            self._out += option_reply(option, OptionReply.ERR_UNSUP, b"option not supported")

    def _on_starttls(self, data: bytes) -> None:
        option = Option.STARTTLS
        if not self.tls_required:
            self._out += option_reply(option, OptionReply.ERR_POLICY, b"TLS is not configured")
        elif self.tls:
            self._out += option_reply(option, OptionReply.ERR_INVALID, b"TLS is active already")
        elif data:
            self._out += option_reply(option, OptionReply.ERR_INVALID, b"STARTTLS takes no data")
        elif self._end > self._pos:
            self._close("client sent data after STARTTLS before the server's reply", True)
        else:
            self._out += option_reply(option, OptionReply.ACK)
            self._expect(State.TLS_HANDSHAKE, 0)
            self._events.append(StartTls())

    def _on_list(self, data: bytes) -> None:
        if data:
            self._out += option_reply(Option.LIST, OptionReply.ERR_INVALID, b"LIST takes no data")
            return
        for export in self.exports.values():
            name = export.name.encode()
            entry = U32.pack(len(name)) + name + export.description.encode()
            self._out += option_reply(Option.LIST, OptionReply.SERVER, entry)
        self._out += option_reply(Option.LIST, OptionReply.ACK)

    def _on_structured_reply(self, data: bytes) -> None:
        option = Option.STRUCTURED_REPLY
        if data:
            text = b"STRUCTURED_REPLY takes no data"
            self._out += option_reply(option, OptionReply.ERR_INVALID, text)
            return
        self.structured = True
        self._out += option_reply(option, OptionReply.ACK)

    def _on_meta_context(self, option: int, data: bytes) -> None:
        """LIST_META_CONTEXT: the contexts the queries match (all, without queries), with id 0;
        SET_META_CONTEXT: select base:allocation if a query names it, for that export only."""
        setting = option == Option.SET_META_CONTEXT
        if setting:
            self._meta = None  # replaced even if this one fails
            if not self.structured:
                text = b"SET_META_CONTEXT needs STRUCTURED_REPLY first"
                self._out += option_reply(option, OptionReply.ERR_INVALID, text)
                return
        parsed = parse_meta_request(data)
        export = self._named(option, parsed, b"malformed metadata context request")
        if export is None or parsed is None:
            return
        queries = parsed[1]
        if any(":" not in query for query in queries):
            text = b"a query starts with a namespace and a colon"
            self._out += option_reply(option, OptionReply.ERR_INVALID, text)
            return
        # "base:" lists the base namespace; SET ignores it and selects only an exact name
        matches = {BASE_ALLOCATION} if setting else {BASE_ALLOCATION, "base:"}
        if (queries or setting) and matches.isdisjoint(queries):
            self._out += option_reply(option, OptionReply.ACK)  # nothing known matched
            return
        context = U32.pack(ALLOCATION_ID if setting else 0) + BASE_ALLOCATION.encode()
        self._out += option_reply(option, OptionReply.META_CONTEXT, context)
        self._out += option_reply(option, OptionReply.ACK)
        if setting:
            self._meta = export

    def _on_info(self, option: int, data: bytes) -> None:
        parsed = parse_info_request(data)
        export = self._named(option, parsed, b"malformed INFO/GO request")
        if export is None or parsed is None:
            return
        name, infos = parsed
        reply = [INFO_EXPORT.pack(Info.EXPORT, export.size, self._transmission_flags())]
        if Info.NAME in infos or name != export.name:
            reply.append(U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in infos and export.description:
            reply.append(U16.pack(Info.DESCRIPTION) + export.description.encode())
        reply.append(INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        for info in reply:
            self._out += option_reply(option, OptionReply.INFO, info)
        self._out += option_reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._begin(export)

    def _on_export_name(self, data: bytes) -> None:
        try:
            export = self._lookup(data.decode())
        except UnicodeDecodeError:
            export = None
        if export is None:  # EXPORT_NAME has no error reply: the spec says hang up
            self._close("client asked for an unknown export", True)
            return
        self._out += EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags())
        if not self.no_zeroes:
            self._out += bytes(EXPORT_NAME_PAD)
        self._begin(export)

    def _named(
        self, option: int, parsed: tuple[str, object] | None, malformed: bytes
    ) -> Export | None:
        """The export named by an option's parsed data (export name first); None, with the
        error replied, if the data was malformed (`parsed` None) or names no export."""
        if parsed is None:
            self._out += option_reply(option, OptionReply.ERR_INVALID, malformed)
            return None
        export = self._lookup(parsed[0])
        if export is None:
            self._out += option_reply(option, OptionReply.ERR_UNKNOWN, b"no such export")
        return export

    def _transmission_flags(self) -> int:
        return TRANSMISSION_FLAGS | (TransmissionFlag.SEND_DF if self.structured else 0)

    def _lookup(self, name: str) -> Export | None:
        return self.exports.get(name) if name else self.default

    def _begin(self, export: Export) -> None:
        self.export = export
        self.allocation = self._meta is export
        self._expect(State.REQUEST_HEADER, REQUEST_HEADER.size)
        self._events.append(Negotiated(export))

    def _on_request_header(
        self, magic: int, flags: int, kind: int, handle: int, offset: int, length: int
    ) -> None:
        if magic != REQUEST_MAGIC:
            self._close(f"bad request magic {magic:#x}", True)
            return
        if kind == _DISC:
            self._close("client disconnected")
            return
        problem = self._check(kind, flags, offset, length)
        if kind == _WRITE:
            if problem is not None:
                error, reason = problem
                self._discard_then(length, Rejected(handle, kind, error, reason))
                self._out += self._error_reply(handle, error, reason)
            elif length:
                self._request = (flags, handle, offset, length)
                self.state, self._want = _WRITE_DATA, length
            else:
                self._emit(Write(handle, offset, 0, FLAGS[flags]))
        elif problem is not None:
            error, reason = problem
            self._out += self._error_reply(handle, error, reason)
            self._events.append(Rejected(handle, kind, error, reason))
        else:
            self._emit(REQUEST_TYPES[kind](handle, offset, length, FLAGS[flags]))

    def _check(self, kind: int, flags: int, offset: int, length: int) -> tuple[Error, str] | None:
        """Why a request may not run (error and reason), or None."""
        assert self.export is not None
        allowed = ALLOWED_FLAGS.get(kind)
        if allowed is None:
            return Error.EINVAL, f"unsupported command {kind}"
        if self.structured:
            allowed |= STRUCTURED_FLAGS.get(kind, 0)
        if flags & ~allowed:  # plain ints: an IntFlag operation costs a microsecond
            return Error.EINVAL, f"flags {flags:#x} not valid for {COMMANDS[kind].name}"
        if kind == _FLUSH:
            return (Error.EINVAL, "FLUSH with an offset or length") if offset or length else None
        if kind == _BLOCK_STATUS:
            if not self.allocation:
                return Error.EINVAL, "BLOCK_STATUS without base:allocation set for this export"
            if not length:
                return Error.EINVAL, "BLOCK_STATUS of no bytes"
        if length > MAX_PAYLOAD and kind <= _WRITE:
            return Error.EINVAL, f"{COMMANDS[kind].name} of {length} bytes, over {MAX_PAYLOAD}"
        if offset + length > self.export.size:
            error = Error.ENOSPC if kind in (_WRITE, _WRITE_ZEROES) else Error.EINVAL
            return error, f"{COMMANDS[kind].name} beyond the end of the export"
        return None

    def _emit(self, request: Request) -> None:
        self._outstanding.add(request)
        self._events.append(request)


def chunk_header(handle: int, kind: ReplyType, length: int, flags: int = REPLY_FLAG_DONE) -> bytes:
    """The header of a structured reply's chunk (by default its one, so final, chunk)."""
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


def data_header(handle: int, offset: int, size: int, flags: int) -> bytes:
    """The header of an OFFSET_DATA chunk of `size` bytes at `offset`."""
    kind, length = ReplyType.OFFSET_DATA, OFFSET_DATA_SIZE + size
    return DATA_CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, length, offset)


def read_chunks(
    parts: list[bytes | memoryview], handle: int, offset: int, data: Sequence[bytes | memoryview]
) -> None:
    """A read's reply as chunks: each run of HOLE_BLOCK pieces an OFFSET_HOLE, each run of
    other pieces an OFFSET_DATA with them; the last chunk is marked DONE."""
    runs = [(hole, list(pieces)) for hole, pieces in groupby(data, lambda p: p is HOLE_BLOCK)]
    for at, (hole, pieces) in enumerate(runs):
        size = sum(map(len, pieces))
        flags = REPLY_FLAG_DONE if at == len(runs) - 1 else 0
        if hole:
            header = chunk_header(handle, ReplyType.OFFSET_HOLE, HOLE_CHUNK.size, flags)
            parts.append(header + HOLE_CHUNK.pack(offset, size))
        else:
            parts.append(data_header(handle, offset, size, flags))
            parts += pieces
        offset += size


def parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Export name and queries of LIST/SET_META_CONTEXT data; None if malformed."""
    name = _string_at(data, 0)
    if name is None or len(data) < name[1] + U32.size:
        return None
    (count,) = U32.unpack_from(data, name[1])
    at, queries = name[1] + U32.size, []
    if count > (len(data) - at) // U32.size:  # more than the data could hold
        return None
    for _ in range(count):
        query = _string_at(data, at)
        if query is None:
            return None
        queries.append(query[0])
        at = query[1]
    return (name[0], queries) if at == len(data) else None


def _string_at(data: bytes, at: int) -> tuple[str, int] | None:
    """The string (32-bit length, UTF-8) at `at` and where it ends; None if malformed."""
    if len(data) < at + U32.size:
        return None
    (size,) = U32.unpack_from(data, at)
    at += U32.size
    if size > min(len(data) - at, MAX_STRING):
        return None
    try:
        return data[at : at + size].decode(), at + size
    except UnicodeDecodeError:
        return None


def parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """Export name and information types of NBD_OPT_INFO/GO data; None if malformed."""
    name = _string_at(data, 0)
    if name is None or len(data) < name[1] + U16.size:
        return None
    (count,) = U16.unpack_from(data, name[1])
    at = name[1] + U16.size
    if len(data) != at + U16.size * count:
        return None
    return name[0], {U16.unpack_from(data, at + U16.size * i)[0] for i in range(count)}
