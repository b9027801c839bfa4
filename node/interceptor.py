# The server interceptor every RPC passes through: the shutdown gate, request parsing and the
# gRPC metrics.
#
# While the node drains (after SIGTERM), new RPCs fail at once with UNAVAILABLE, except health
# checks, which keep answering NOT_SERVING until the server stops; RPCs already running go on.
# Each RPC is counted as started, then as handled with its final code and timed, in the
# go-grpc-prometheus manner.  Wrapped handlers are built once per method and cached, so the
# per-RPC cost is one closure call and three metric updates.  The behaviour's code is read from
# the servicer context after it returns or aborts; a cancelled RPC counts as Canceled and an
# escaped exception as Unknown, which is what the client sees.
#
# Requests are parsed here, not by gRPC: the wrapped handler takes raw bytes and parses them
# itself (each message of a request stream too), so bytes that protobuf cannot parse fail the
# call with INVALID_ARGUMENT ("the request could not be parsed"), and are counted as such, on
# every method of every service.  Left to gRPC, the DecodeError would escape as UNKNOWN before
# any of our code (or metrics) ran.  Parsing costs the same either way: the handler's own reader
# (FromString, or for the bulk RPCs ramster.bulkwire's, which raise DecodeError too).  The
# call is aborted by its own task (Unparsable), since a servicer may read a request stream in
# a task of its own and two tasks must not end one call.
#
# Client calls (ramster.v1.Tmem) are authenticated here, before the request is parsed or the
# servicer runs: with a tokens file, a call without a valid bearer token fails UNAUTHENTICATED
# (the message never repeats what was sent); the caller's tenant is put in node.tenants.CALLER
# for the servicer.  Health, reflection and the peer API are not client calls.
#
# Open streams are limited per client (--max-streams): per tenant with a tokens file, else per
# client address (node.tenants.client_of), counted from the moment a client stream is admitted
# until it ends; one more fails at once with RESOURCE_EXHAUSTED, so a client that opens streams
# without end holds at most that many of the node's stream states, and other clients' calls go
# on.  Peer API streams (an owner's fetch call, a Reclaim) count per peer address, apart from
# client streams.  Unary calls are not counted: each holds the node for one request only.
#
# A small client call (node.servicer.SMALL) is announced to node.fairness.SmallFirst as soon as
# it is intercepted, before gRPC reads its message, and leaves when its handler ends, so bulk
# steps wait for it from the earliest point the node sees it.  A page call on a Pages stream
# passes here once per stream; the servicer announces each of them as it reads it.
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from node.fairness import SmallFirst
from node.metrics import GrpcMetrics
from node.peering import PEER_SERVICE
from node.servicer import SMALL
from node.status import go_code_name
from node.tenants import CALLER, Tenants, address_of, client_of
from ramster.v1 import tmem_pb2

HEALTH_SERVICE = "grpc.health.v1.Health"
CLIENT_SERVICE = tmem_pb2.DESCRIPTOR.services_by_name["Tmem"].full_name
SMALL_METHODS = frozenset(f"/{CLIENT_SERVICE}/{method}" for method in SMALL)
HANDLER_FACTORIES = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}


@dataclass
class Gate:
    """Whether the node takes new RPCs, and how many are running.  While draining, only the
    services in `always` are admitted (health; with peers, the peer service, which owners need
    to take back what a leaving node holds)."""

    draining: bool = False
    in_flight: int = 0
    always: set[str] = field(default_factory=lambda: {HEALTH_SERVICE})

    def admits(self, service: str) -> bool:
        return not self.draining or service in self.always

    async def idle(self, timeout: float) -> None:
        """Wait until no RPC is running, or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class StreamLimit:
    """Client streams open per client (tenant, or address without tokens), at most `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def enter(self, client: str) -> bool:
        count = self.open.get(client, 0)
        if count >= self.limit:
            return False
        self.open[client] = count + 1
        return True

    def leave(self, client: str) -> None:
        count = self.open.pop(client) - 1
        if count:
            self.open[client] = count


class Unparsable(Exception):
    """A request protobuf cannot parse; the call's own task aborts it with INVALID_ARGUMENT (a
    servicer may read a request stream in another task, which must not end the call)."""


class _Call:
    """Accounting of one RPC: in-flight count, then handled code and latency on exit."""

    __slots__ = ("context", "gate", "handled", "seconds", "start")

    def __init__(self, gate: Gate, context: Any, handled: Callable[[str], Any], seconds: Any):
        self.gate, self.context, self.handled, self.seconds = gate, context, handled, seconds
        self.start = 0.0

    def __enter__(self) -> _Call:
        self.gate.in_flight += 1
        self.start = time.perf_counter()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.seconds.observe(time.perf_counter() - self.start)
        if kind is None or isinstance(exc, grpc.aio.AbortError):
            code = self.context.code() or grpc.StatusCode.OK
            if isinstance(code, int):
                code = grpc.StatusCode(code)  # some grpc versions return the raw number
        elif issubclass(kind, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        self.handled(go_code_name(code)).inc()
        self.gate.in_flight -= 1


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        gate: Gate,
        metrics: GrpcMetrics,
        tenants: Tenants,
        streams: StreamLimit,
        small_first: SmallFirst | None = None,
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.tenants = tenants
        self.streams = streams
        self.small_first = small_first
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        if self.small_first is not None and details.method in SMALL_METHODS:
            self.small_first.arrive()
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED, no labels made
                return None
            wrapped = self._wrapped[details.method] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, full_method: str, handler: Any) -> Any:
        service, _, method = full_method.lstrip("/").rpartition("/")
        kind = {
            (False, False): "unary",
            (False, True): "server_stream",
            (True, False): "client_stream",
            (True, True): "bidi_stream",
        }[(bool(handler.request_streaming), bool(handler.response_streaming))]
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        started = self.metrics.started.labels(kind, service, method)
        seconds = self.metrics.seconds.labels(kind, service, method)
        handled_children: dict[str, Any] = {}

        def handled(code: str) -> Any:
            child = handled_children.get(code)
            if child is None:
                child = handled_children[code] = self.metrics.handled.labels(
                    kind, service, method, code
                )
            return child

        gate = self.gate
        parse: Callable[[bytes], Any] | None = handler.request_deserializer

        def parsed(raw: bytes) -> Any:
            if parse is None:
                return raw
            try:
                return parse(raw)
            except DecodeError as exc:
                raise Unparsable(
                    f"the request to {full_method} could not be parsed: {exc}"
                ) from None

        async def parsed_stream(raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raws:
                yield parsed(raw)

        def take(request: Any) -> Any:
            """The parsed request, or for a request stream the stream of parsed requests."""
            return parsed_stream(request) if handler.request_streaming else parsed(request)

        tenants = self.tenants if service == CLIENT_SERVICE else None
        streams = self.streams

        async def admit(context: Any) -> _Call:
            started.inc()
            call = _Call(gate, context, handled, seconds)
            if not gate.admits(service):
                with call:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
            if tenants is not None:
                tenant = tenants.authenticate(context.invocation_metadata() or ())
                if tenant is None:
                    with call:
                        await context.abort(
                            grpc.StatusCode.UNAUTHENTICATED,
                            "this node needs a valid 'authorization: Bearer <token>'",
                        )
                else:
                    CALLER.set(tenant)
            return call

        new_behavior: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def stream_behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                with await admit(context):
                    client = None
                    if tenants is not None:
                        client = client_of(CALLER.get(), str(context.peer() or ""))
                    elif service == PEER_SERVICE:
                        client = "peer " + address_of(str(context.peer() or ""))
                    if client is not None and not streams.enter(client):
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"this client has {streams.limit} streams open already, the most "
                            "the node allows (--max-streams): end one first",
                        )
                    try:
                        async for response in behavior(take(request), context):
                            yield response
                    except Unparsable as exc:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    finally:
                        if client is not None:
                            streams.leave(client)

            new_behavior = stream_behavior
        else:
            small_first = self.small_first if full_method in SMALL_METHODS else None

            async def call_behavior(request: Any, context: Any) -> Any:
                try:
                    with await admit(context):
                        try:
                            request = take(request)
                        except Unparsable as exc:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        return await behavior(request, context)
                finally:
                    if small_first is not None:
                        small_first.leave()

            new_behavior = call_behavior

        return HANDLER_FACTORIES[kind](
            new_behavior,
            request_deserializer=None,  # parsed by `take`, so a malformed request is ours to fail
            response_serializer=handler.response_serializer,
        )
