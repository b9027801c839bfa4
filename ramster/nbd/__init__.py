# ramster.nbd: the NBD protocol (network block device, as Linux's nbd driver, qemu, libnbd and
# nbdkit speak it), sans-IO.  ServerConnection turns a client's bytes into typed events and
# encodes the replies; ExportLister is the small client side that lists a server's exports.
# Neither does I/O: node/nbd/ drives the server over asyncio, `ramster nbd list` the lister
# over a blocking socket.  See server.py for what is spoken and what is refused.
from ramster.nbd.client import ExportInfo, ExportLister, NbdError
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
)
from ramster.nbd.server import (
    HOLE_BLOCK,
    MAX_PAYLOAD,
    PREFERRED_BLOCK,
    ProtocolMisuse,
    ServerConnection,
)
from ramster.nbd.wire import CommandFlag, Error, TransmissionFlag

__all__ = [
    "HOLE_BLOCK",
    "MAX_PAYLOAD",
    "NEED_DATA",
    "PREFERRED_BLOCK",
    "BlockStatus",
    "Closed",
    "CommandFlag",
    "Error",
    "Event",
    "Export",
    "ExportInfo",
    "ExportLister",
    "Flush",
    "NbdError",
    "Negotiated",
    "ProtocolMisuse",
    "Read",
    "Rejected",
    "Reply",
    "Request",
    "ServerConnection",
    "StartTls",
    "TransmissionFlag",
    "Trim",
    "Write",
    "WriteZeroes",
]
