# Client exceptions: one class per gRPC status a caller may want to handle, each carrying `.code`
# (a grpc.StatusCode) and the server's message, so callers never inspect grpc.RpcError.
# Stream replies carry a status number instead of raising; from_status() maps both the same way.
# InvalidArgument is also a ValueError: the client raises it itself, before sending, for a request
# the node would refuse (a key out of range, pages that do not match their keys), so a caller
# sees one exception for a bad argument whichever end caught it.
from __future__ import annotations

import grpc


class RamsterError(Exception):
    """A call to a node failed; `.code` is the gRPC status."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.args[0]}"


class InvalidArgument(RamsterError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RamsterError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RamsterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RamsterError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RamsterError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(RamsterError):
    """The page's data is lost: every copy of it failed verification, so no bytes came back."""

    code = grpc.StatusCode.DATA_LOSS


class PageUnavailable(Unavailable):
    """The node knows the page but can reach no copy of it now (its holders are down)."""


_BY_CODE: dict[grpc.StatusCode, type[RamsterError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        DataLoss,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> RamsterError:
    return _BY_CODE.get(code, RamsterError)(message, code)


def from_code_number(number: int, message: str) -> RamsterError:
    code = next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
    return from_status(code, message)


def from_rpc_error(exc: grpc.RpcError) -> RamsterError:
    return from_status(exc.code(), exc.details() or exc.code().name.lower())
