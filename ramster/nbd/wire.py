# The NBD wire format: magic numbers, option/reply/command codes, flags, error values and the
# fixed-size structures of the fixed newstyle handshake and the transmission phase, as the
# protocol document of the reference implementation (NetworkBlockDevice/nbd, doc/proto.md)
# defines them.  Every integer is big-endian ("network byte order").
#
# Only what this server speaks is here: fixed newstyle negotiation, NBD_OPT_INFO/GO, STARTTLS,
# simple and structured replies, and the base:allocation metadata context with its BLOCK_STATUS.
# Extended headers are answered with an error by the server machine (see server.py), so their
# code appears only to name it.  Structures are struct.Struct objects whose sizes are checked
# right here (the BUILD_BUG_ON of this module): a typo in a format would otherwise only show up
# on the wire.
from __future__ import annotations

import enum
import struct

# -- magic numbers ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", the first 8 bytes a server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting, and every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9

    @property
    def is_error(self) -> bool:
        return bool(self & REP_ERROR_BIT)


class Info(enum.IntEnum):
    """Information types of NBD_REP_INFO (asked for in NBD_OPT_INFO/GO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1 << 0  # the last chunk of a structured reply


class ReplyType(enum.IntEnum):
    """Structured reply chunk types; those with bit 15 set are errors."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


# The one metadata context the protocol defines, and its status flags.
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0  # not allocated
STATE_ZERO = 1 << 1  # reads as zeros


class Error(enum.IntEnum):
    """Error values of a reply (errno-like, but fixed by the protocol)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# -- structures ----------------------------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
EXPORT_NAME_PAD = 124
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, reply flags, chunk type, handle, payload length
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # CHUNK_HEADER of an OFFSET_DATA chunk, its offset
ERROR_CHUNK = struct.Struct(">IH")  # error, message length (then the message)
HOLE_CHUNK = struct.Struct(">QI")  # an OFFSET_HOLE chunk's payload: offset, size
EXTENT = struct.Struct(">II")  # a BLOCK_STATUS descriptor: length, status flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

assert GREETING.size == 18 and OPTION_HEADER.size == 16 and OPTION_REPLY_HEADER.size == 20
assert INFO_EXPORT.size == 12 and INFO_BLOCK_SIZE.size == 14 and EXPORT_NAME_REPLY.size == 10
assert REQUEST_HEADER.size == 28 and SIMPLE_REPLY_HEADER.size == 16
assert CHUNK_HEADER.size == 20 and DATA_CHUNK_HEADER.size == 28
assert ERROR_CHUNK.size == 6 and EXTENT.size == 8 and HOLE_CHUNK.size == 12

MAX_STRING = 4096  # longest export name or message the protocol allows


def option_reply(option: int, reply: OptionReply, data: bytes = b"") -> bytes:
    """One option reply: header and data."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def option_request(option: Option, data: bytes = b"") -> bytes:
    """One option request, as a client sends it."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def meta_request(name: str, queries: list[str]) -> bytes:
    """The data of NBD_OPT_LIST/SET_META_CONTEXT: the export name and the queries."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return U32.pack(len(raw)) + raw

    return string(name) + U32.pack(len(queries)) + b"".join(map(string, queries))


def info_request(name: str, infos: tuple[Info, ...]) -> bytes:
    """The data of NBD_OPT_INFO/GO: the export name and the information asked for."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)
