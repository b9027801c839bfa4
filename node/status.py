# How failures become gRPC status codes: one table, used by unary RPCs (abort) and by the stream
# (a per-request Error message), so both report the same code and message for the same mistake.
#
#   bad page, key, batch or setting (ValueError family)   INVALID_ARGUMENT
#   unknown pool                                          NOT_FOUND
#   RpcFailure raised by a servicer                       its own code (RESOURCE_EXHAUSTED ...)
#   anything else (a bug)                                 INTERNAL, logged with its traceback
#
# go_code_name() spells a code as the grpc_code label of the metrics does (Go's names).
from __future__ import annotations

import logging

import grpc

from node.logs import log_event
from ramster.zcache import UnknownPool


class RpcFailure(Exception):
    """An RPC outcome that is an error status by design (e.g. a put refused for no room)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_of(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, str(exc)
    if isinstance(exc, UnknownPool):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log_event("rpc_failed", logging.ERROR, method=method, error=repr(exc), exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}"


def go_code_name(code: grpc.StatusCode) -> str:
    """The Go spelling of a status code (grpc_code label): OK, Canceled, InvalidArgument..."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(word.capitalize() for word in code.name.split("_"))
