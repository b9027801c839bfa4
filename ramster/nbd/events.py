# What the NBD server machine tells its I/O shell, and what the shell hands back to it.
#
# Events out (ServerConnection.next_event): StartTls when the shell must upgrade the transport to
# TLS (server side) and then call tls_started(); Negotiated when a client has chosen an export and
# transmission begins; one Request subclass per command the shell must carry out (Read, Write,
# Flush, Trim, WriteZeroes, BlockStatus), each already checked against the export (range, length,
# flags), so a shell never sees a request it may not execute; Rejected for a request the machine
# answered with an error itself (the shell only counts it); Closed when the connection is over,
# cleanly or not.  Back in (ServerConnection.send): one Reply per Request.  Requests compare by
# identity (eq=False): two requests may carry the same handle, yet each is answered exactly once.
# A Write's data is a view of the machine's input (no copy), valid for as long as it is kept.
# Requests are plain slotted dataclasses, not frozen ones: one is made per request, and a frozen
# dataclass pays object.__setattr__ per field (treat them as read-only all the same).
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ramster.nbd.wire import Command, CommandFlag, Error


@dataclass(frozen=True)
class Export:
    """One export as clients see it: a name and a size in bytes."""

    name: str
    size: int
    description: str = ""


class Event:
    """Base of everything next_event() returns."""

    __slots__ = ()


@dataclass(frozen=True, eq=False)
class StartTls(Event):
    """STARTTLS was acknowledged (the ACK is in data_to_send()): send it, then run the TLS
    handshake as the server, then call tls_started().  A failed handshake ends the connection."""


@dataclass(frozen=True, eq=False)
class Negotiated(Event):
    export: Export


@dataclass(eq=False, slots=True)
class Request(Event):
    handle: int
    offset: int
    length: int
    flags: CommandFlag
    command: ClassVar[Command]


@dataclass(eq=False, slots=True)
class Read(Request):
    command = Command.READ


@dataclass(eq=False, slots=True)
class Write(Request):
    data: bytes | memoryview = b""  # the machine's: a view of its input buffer
    command = Command.WRITE


@dataclass(eq=False, slots=True)
class Flush(Request):
    command = Command.FLUSH


@dataclass(eq=False, slots=True)
class Trim(Request):
    command = Command.TRIM


@dataclass(eq=False, slots=True)
class WriteZeroes(Request):
    command = Command.WRITE_ZEROES


@dataclass(eq=False, slots=True)
class BlockStatus(Request):
    """Which blocks of the range hold data (base:allocation); answered with extents."""

    command = Command.BLOCK_STATUS


@dataclass(frozen=True, eq=False)
class Rejected(Event):
    """A request answered with `error` by the machine itself; `reason` is for logs."""

    handle: int
    command: int
    error: Error
    reason: str


@dataclass(frozen=True, eq=False)
class Closed(Event):
    """The connection is over: the shell sends what data_to_send() holds, then closes.
    `violation` is set when the client broke the protocol or hung up mid-message."""

    reason: str
    violation: bool = False


@dataclass(frozen=True, eq=False)
class Reply:
    """The answer to one Request: an error, or success (with the data of a Read)."""

    request: Request
    error: Error = Error.OK
    data: bytes = b""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()  # next_event(): nothing more until receive_data()
