# AsyncClient: the asyncio client of one node (grpc.aio), and Stream, its pipelined batch session.
#
# Over TLS when given the cluster CA (ramster/client/tls.py); with a token, every Tmem call (and
# the stream) carries `authorization: Bearer <token>` (health checks need none).  Every unary
# call carries a deadline (the client's `timeout` unless the call gives one) and raises
# RamsterError subclasses, never grpc.RpcError.  Batches take keys as (oid, index) pairs or a
# KeyRange; put_many/get_many cut any number of consecutive pages into maximal batches.
#
# A Stream keeps one bidirectional RPC open: put_batch()/get_batch() send a request and return a
# future of its reply at once, so a caller keeps several batches in flight and the node never
# waits for the client.  The node answers in order, so replies are matched to the oldest pending
# request (and checked by id).  A stream is long-lived and has no deadline unless given one; when
# it fails, every pending and later request fails with the stream's error.
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ramster.client.errors import (
    PageUnavailable,
    RamsterError,
    Unavailable,
    from_code_number,
    from_rpc_error,
)
from ramster.client.messages import (
    GetResult,
    KeyRange,
    Keys,
    decode_get,
    decode_put,
    get_batch_request,
    key,
    put_batch_request,
)
from ramster.client.tls import PathLike, open_channel
from ramster.client.wire import Outcome
from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc

DEFAULT_TIMEOUT = 30.0
KINDS = {"persistent": pb.POOL_KIND_PERSISTENT, "ephemeral": pb.POOL_KIND_EPHEMERAL}
KIND_NAMES = {v: k for k, v in KINDS.items()}
T = TypeVar("T")


@dataclass(frozen=True)
class PoolInfo:
    pool: int
    kind: str  # "persistent" or "ephemeral"
    allocator: str
    pages: int


def pool_infos(pools: Sequence[pb.PoolInfo]) -> list[PoolInfo]:
    return [
        PoolInfo(p.pool, KIND_NAMES.get(p.kind, "persistent"), p.allocator, p.pages) for p in pools
    ]


async def _rpc(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class AsyncClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        token: str | None = None,
    ) -> None:
        """A client of the node at `target`; with `tls_ca` (the cluster CA) over TLS, with
        `tls_cert`/`tls_key` showing a client certificate too; with `token`, every call carries
        it as `authorization: Bearer <token>` (a node run with --tokens needs one)."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(target, tls_ca, tls_cert, tls_key)
        self._tmem = tmem_pb2_grpc.TmemStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Awaitable[Any]:
        rpc = getattr(self._tmem, method)
        timeout = self.timeout if timeout is None else timeout
        return _rpc(rpc(request, timeout=timeout, metadata=self._metadata))

    # -- pools -------------------------------------------------------------------------------
    async def create_pool(
        self, kind: str = "persistent", allocator: str | None = None, timeout: float | None = None
    ) -> int:
        """A new pool's id; kind is 'persistent' or 'ephemeral', allocator 'zbud'/'zsmalloc'."""
        if kind not in KINDS:
            raise RamsterError(f"pool kind must be one of {', '.join(KINDS)}, got {kind!r}")
        request = pb.CreatePoolRequest(kind=KINDS[kind], allocator=allocator or "")
        reply = await self._call("CreatePool", request, timeout)
        return int(reply.pool)

    async def destroy_pool(self, pool: int, timeout: float | None = None) -> int:
        """Drop a pool; how many pages it held."""
        reply = await self._call("DestroyPool", pb.DestroyPoolRequest(**key(pool)), timeout)
        return int(reply.pages)

    async def list_pools(self, timeout: float | None = None) -> list[PoolInfo]:
        reply = await self._call("ListPools", pb.ListPoolsRequest(), timeout)
        return pool_infos(reply.pools)

    # -- single pages ------------------------------------------------------------------------
    async def put(
        self, pool: int, oid: int, index: int, page: bytes, timeout: float | None = None
    ) -> Outcome:
        """Store one page.  Raises ResourceExhausted when the node has no room for it."""
        request = pb.PutRequest(**key(pool, oid, index), page=page)
        reply = await self._call("Put", request, timeout)
        return Outcome(reply.outcome)

    async def get(
        self,
        pool: int,
        oid: int,
        index: int,
        exclusive: bool = False,
        timeout: float | None = None,
    ) -> bytes | None:
        """The page, or None.  Raises DataLoss if every copy of it failed verification (its data
        is lost) and PageUnavailable if no copy can be reached now."""
        request = pb.GetRequest(**key(pool, oid, index), exclusive=exclusive)
        reply = await self._call("Get", request, timeout)
        if reply.status == pb.PAGE_STATUS_UNAVAILABLE:
            raise PageUnavailable(f"pool {pool} page ({oid}, {index}) has no reachable copy")
        return reply.page if reply.status == pb.PAGE_STATUS_HIT else None

    async def flush_page(
        self, pool: int, oid: int, index: int, timeout: float | None = None
    ) -> bool:
        request = pb.FlushPageRequest(**key(pool, oid, index))
        return bool((await self._call("FlushPage", request, timeout)).found)

    async def flush_object(self, pool: int, oid: int, timeout: float | None = None) -> int:
        request = pb.FlushObjectRequest(**key(pool, oid))
        return int((await self._call("FlushObject", request, timeout)).pages)

    # -- batches -----------------------------------------------------------------------------
    async def put_batch(
        self, pool: int, keys: Keys, pages: Sequence[bytes], timeout: float | None = None
    ) -> list[Outcome]:
        """Store up to 4096 pages; one outcome per page (refusals are outcomes, not errors)."""
        reply = await self._call("PutBatch", put_batch_request(pool, keys, pages), timeout)
        return decode_put(reply)

    async def get_batch(
        self, pool: int, keys: Keys, exclusive: bool = False, timeout: float | None = None
    ) -> GetResult:
        reply = await self._call("GetBatch", get_batch_request(pool, keys, exclusive), timeout)
        return decode_get(reply)

    async def put_many(
        self, pool: int, oid: int, start: int, pages: Sequence[bytes], timeout: float | None = None
    ) -> list[Outcome]:
        """Store pages start, start+1, ... of an object, in as few batches as the limit allows."""
        outcomes: list[Outcome] = []
        for part in KeyRange(oid, start, len(pages)).chunks():
            first = part.start - start
            chunk = pages[first : first + part.count]
            outcomes += await self.put_batch(pool, part, chunk, timeout)
        return outcomes

    async def get_many(
        self,
        pool: int,
        oid: int,
        start: int,
        count: int,
        exclusive: bool = False,
        timeout: float | None = None,
    ) -> GetResult:
        """Pages start, ..., start+count-1 of an object, in as few batches as the limit allows."""
        statuses, pages = [], []
        for part in KeyRange(oid, start, count).chunks():
            result = await self.get_batch(pool, part, exclusive, timeout)
            statuses += result.statuses
            pages += result.pages
        return GetResult(statuses, pages)

    # -- node --------------------------------------------------------------------------------
    async def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        reply: pb.StatsResponse = await self._call("Stats", pb.StatsRequest(), timeout)
        return reply

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard health status: 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN', ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await _rpc(
            self._health.Check(request, timeout=self.timeout if timeout is None else timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def stream(self, timeout: float | None = None) -> Stream:
        """A pipelined batch session: `async with client.stream() as s: ...`."""
        return Stream(self._tmem, timeout, self._metadata)


class Stream:
    def __init__(
        self, stub: Any, timeout: float | None, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = stub
        self._timeout = timeout
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: deque[tuple[int, asyncio.Future[Any], Callable[[Any], Any]]] = deque()
        self._next_id = 0
        self._failure: RamsterError | None = None
        self._cancelled = False  # by us, on leaving the block with an exception

    async def __aenter__(self) -> Stream:
        self._call = self._stub.Stream(timeout=self._timeout, metadata=self._metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and self._failure is None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._call.done_writing()  # on failure, the reader says how it ended
        else:
            self._cancelled = True
            self._call.cancel()
        if self._reader:
            await self._reader
        if kind is None and self._failure is not None:
            raise self._failure

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def put_batch(
        self, pool: int, keys: Keys, pages: Sequence[bytes]
    ) -> asyncio.Future[list[Outcome]]:
        """Send a put batch; the returned future resolves to its outcomes."""
        request = pb.StreamRequest(put=put_batch_request(pool, keys, pages))
        return await self._send(request, lambda reply: decode_put(reply.put))

    async def get_batch(
        self, pool: int, keys: Keys, exclusive: bool = False
    ) -> asyncio.Future[GetResult]:
        """Send a get batch; the returned future resolves to its GetResult."""
        request = pb.StreamRequest(get=get_batch_request(pool, keys, exclusive))
        return await self._send(request, lambda reply: decode_get(reply.get))

    async def flush_object(self, pool: int, oid: int) -> asyncio.Future[int]:
        request = pb.StreamRequest(flush_object=pb.FlushObjectRequest(**key(pool, oid)))
        return await self._send(request, lambda reply: int(reply.flush_object.pages))

    async def _send(
        self, request: pb.StreamRequest, decode: Callable[[Any], T]
    ) -> asyncio.Future[T]:
        if self._failure is not None:
            raise self._failure
        if self._call is None:
            raise RamsterError("use the stream inside 'async with client.stream() as s'")
        request.id = self._next_id
        self._next_id += 1
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((request.id, future, decode))
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            self._fail(from_rpc_error(exc))
        except asyncio.InvalidStateError:
            self._fail(Unavailable("the stream has ended"))
        return future

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                expected = self._pending[0][0] if self._pending else None
                if reply.id != expected:
                    raise RamsterError(
                        f"stream reply {reply.id} answers no request (expected {expected})",
                        grpc.StatusCode.INTERNAL,
                    )
                _, future, decode = self._pending.popleft()
                if future.done():
                    continue
                if reply.WhichOneof("result") == "error":
                    future.set_exception(from_code_number(reply.error.code, reply.error.message))
                else:
                    try:
                        future.set_result(decode(reply))
                    except RamsterError as exc:
                        future.set_exception(exc)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED or self._failure is None:
                self._fail(from_rpc_error(exc))
        except RamsterError as exc:
            self._fail(exc)
            self._call.cancel()
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            self._fail(RamsterError("the stream was cancelled", grpc.StatusCode.CANCELLED))
        if self._pending:
            self._fail(Unavailable("the stream ended with requests unanswered"))

    def _fail(self, error: RamsterError) -> None:
        if self._failure is None:
            self._failure = error
        while self._pending:
            _, future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
