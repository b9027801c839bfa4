# The client side of NBD option haggling, just far enough to list a server's exports: sans-IO
# like the server machine (bytes in, bytes out), for `ramster nbd list` and for tests that talk
# to the server machine in memory.
#
# Sequence: read the greeting, send client flags (fixed newstyle, no zeroes); with tls, send
# NBD_OPT_STARTTLS and, once the server acknowledges it, set `upgrade`: the shell then wraps its
# socket in TLS and calls tls_started() (the lister never sees the TLS bytes); then NBD_OPT_LIST;
# collect the NBD_REP_SERVER names; send NBD_OPT_INFO for each name asking for its description
# and block sizes, then NBD_OPT_LIST_META_CONTEXT with no query (every metadata context the
# export offers, such as base:allocation); then NBD_OPT_ABORT, and `done` once the server
# acknowledges it (or hangs up, which the spec allows after ABORT).  A server that breaks the
# protocol raises NbdError naming what it sent; an error reply to INFO is kept on that export
# rather than raised, since one bad export should not hide the others, and an error reply to the
# context listing (a server without metadata contexts answers ERR_UNSUP) leaves it none.
from __future__ import annotations

from dataclasses import dataclass, field

from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAG_NO_ZEROES,
    CLIENT_FLAGS,
    FLAG_FIXED_NEWSTYLE,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    U16,
    U32,
    Info,
    Option,
    OptionReply,
    info_request,
    meta_request,
    option_request,
)

MAX_EXPORTS = 10_000  # a server that lists more is taken as broken (or hostile): the lister's
MAX_CONTEXTS = 256  # memory is bounded whatever it sends
MAX_REPLY = 64 * 1024  # option reply data (names and descriptions are at most 4 KiB each)


class NbdError(Exception):
    """The server broke the protocol or refused the listing; the message says how."""


@dataclass
class ExportInfo:
    name: str
    description: str = ""
    size: int = 0
    flags: int = 0  # TransmissionFlag bits
    block_sizes: tuple[int, int, int] = (0, 0, 0)  # minimum, preferred, maximum (0: unsaid)
    error: str = ""  # the server's error reply to INFO, if it gave one
    contexts: list[str] = field(default_factory=list)  # metadata contexts (base:allocation)


class ExportLister:
    def __init__(self, tls: bool = False) -> None:
        self.exports: list[ExportInfo] = []
        self.done = False
        self.tls = tls
        self.upgrade = False  # STARTTLS was acknowledged: the shell must start TLS now
        self._buf = bytearray()
        self._out = bytearray()
        self._greeted = False
        self._asking = -1  # index into exports of the INFO in flight; -1: LIST in flight
        self._listing_contexts = False  # ... or of its LIST_META_CONTEXT
        self._aborting = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" when it closed the connection."""
        if not data:
            if self._aborting:
                self.done = True
                return
            raise NbdError("the server closed the connection during negotiation")
        self._buf += data
        if not self._greeted:
            if len(self._buf) < GREETING.size:
                return
            self._on_greeting(bytes(self._buf[: GREETING.size]))
            del self._buf[: GREETING.size]
        while len(self._buf) >= OPTION_REPLY_HEADER.size and not self.done and not self.upgrade:
            magic, option, reply, length = OPTION_REPLY_HEADER.unpack_from(self._buf)
            if magic != OPTION_REPLY_MAGIC:
                raise NbdError(f"bad option reply magic {magic:#x}")
            if length > MAX_REPLY:
                raise NbdError(f"an option reply of {length} bytes (at most {MAX_REPLY} expected)")
            end = OPTION_REPLY_HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[OPTION_REPLY_HEADER.size : end])
            del self._buf[:end]
            self._on_reply(option, reply, payload)

    def _on_greeting(self, chunk: bytes) -> None:
        magic, opt_magic, flags = GREETING.unpack(chunk)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not a newstyle NBD server (bad greeting magic)")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("the server does not speak fixed newstyle negotiation")
        self._greeted = True
        self._out += CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
        self._out += option_request(Option.STARTTLS if self.tls else Option.LIST)

    def tls_started(self) -> None:
        """The shell's socket speaks TLS now: the listing begins."""
        self.upgrade = False
        self._out += option_request(Option.LIST)

    def _on_reply(self, option: int, reply: int, payload: bytes) -> None:
        text = payload.decode(errors="replace")
        if self._aborting:
            self.done = True
        elif option == Option.STARTTLS:
            if reply != OptionReply.ACK:
                raise NbdError(f"the server refused TLS: {text or hex(reply)}")
            self.upgrade = True
        elif self._asking < 0:
            if reply == OptionReply.SERVER:
                if len(self.exports) == MAX_EXPORTS:
                    raise NbdError(f"the server listed over {MAX_EXPORTS} exports")
                (size,) = U32.unpack_from(payload) if len(payload) >= U32.size else (-1,)
                if not 0 <= size <= len(payload) - U32.size:
                    raise NbdError(f"a malformed export name in the list: {payload[:64]!r}")
                name, description = payload[4 : 4 + size], payload[4 + size :]
                export = ExportInfo(name.decode(errors="replace"))
                export.description = description.decode(errors="replace")
                self.exports.append(export)
            elif reply == OptionReply.ACK:
                self._next()
            elif reply == OptionReply.ERR_TLS_REQD:
                raise NbdError("the server requires TLS (give the cluster CA: --tls-ca)")
            else:
                raise NbdError(f"the server refused to list its exports: {text or reply}")
        elif self._listing_contexts:
            contexts = self.exports[self._asking].contexts
            if reply == OptionReply.META_CONTEXT and len(payload) > U32.size:
                if len(contexts) == MAX_CONTEXTS:
                    raise NbdError(f"the server listed over {MAX_CONTEXTS} contexts for an export")
                contexts.append(payload[U32.size :].decode(errors="replace"))
            elif reply != OptionReply.META_CONTEXT:  # ACK, or an error: no (more) contexts
                self._next()
        elif reply == OptionReply.INFO:
            self._on_info(self.exports[self._asking], payload)
        else:
            export = self.exports[self._asking]
            if reply != OptionReply.ACK:
                export.error = text or f"reply {reply:#x}"
                self._next()
                return
            self._listing_contexts = True
            self._out += option_request(Option.LIST_META_CONTEXT, meta_request(export.name, []))

    def _on_info(self, export: ExportInfo, payload: bytes) -> None:
        if len(payload) < U16.size:
            raise NbdError(f"an information reply of {len(payload)} bytes for {export.name!r}")
        (kind,) = U16.unpack_from(payload)
        if kind == Info.EXPORT and len(payload) == INFO_EXPORT.size:
            _, export.size, flags = INFO_EXPORT.unpack(payload)
            export.flags = flags
        elif kind == Info.BLOCK_SIZE and len(payload) == INFO_BLOCK_SIZE.size:
            export.block_sizes = INFO_BLOCK_SIZE.unpack(payload)[1:]
        elif kind == Info.DESCRIPTION:
            export.description = payload[2:].decode(errors="replace")

    def _next(self) -> None:
        self._asking += 1
        self._listing_contexts = False
        if self._asking < len(self.exports):
            name = self.exports[self._asking].name
            asks = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
            self._out += option_request(Option.INFO, info_request(name, asks))
        else:
            self._aborting = True
            self._out += option_request(Option.ABORT)
