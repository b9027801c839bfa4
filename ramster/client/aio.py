# AsyncClient: the asyncio client of one node (grpc.aio), and Stream, its pipelined batch session.
#
# Over TLS when given the cluster CA (ramster/client/tls.py); with a token, every Tmem call (and
# the stream) carries `authorization: Bearer <token>` (health checks need none).  Every unary
# call carries a deadline (the client's `timeout` unless the call gives one) and raises
# RamsterError subclasses, never grpc.RpcError.  Batches take keys as (oid, index) pairs or a
# KeyRange; put_many/get_many cut any number of consecutive pages into maximal batches.
#
# The single-page calls (get, put, flush_page, flush_object) go over one Tmem.Pages stream, opened
# by the first of them and again after it failed (the node restarted, or drained): a message on an
# open stream costs both ends well under half the CPU of a unary call through grpc.aio, which sets
# up a call of its own (node/servicer.py has the numbers), and a page fault's latency and its tail
# under load follow.  Calls from many tasks share the stream (their writes take turns, and the node
# answers in order); each call's deadline covers its send and its reply, and a reply that comes
# after its deadline is dropped.  A write cut short by its deadline may have left half a request, so
# it fails the stream (every call pending on it too); the next call opens a new one. Semantics are
# the unary calls': a put refused for no room raises ResourceExhausted, a corrupt page DataLoss, an
# unreachable one PageUnavailable; the stream counts as one of the client's streams (the node's
# --max-streams).  The other small calls go through the generated, typed stub; the bulk ones
# (PutBatch, GetBatch, Stream) through callables of the same methods that write and read with
# ramster.bulkwire, so a batch's pages are joined once on the way out and sliced once on the way in,
# never copied through protobuf objects (the bytes on the wire are the same).  A stream batch goes
# as requests of at most STREAM_PART_PAGES pages (1 MiB), whose replies are put back together into
# the batch's: each message is one piece of work that the node's event loop cannot slice (gRPC
# copies a message whole on its way in and out), so smaller messages keep other calls' waits short.
# The whole batch is checked before its first part is sent; a part the node refuses (a quota reached
# meanwhile, a pool destroyed) fails the batch, whose earlier parts may have been applied, as a
# batch is never atomic as a whole (each page is).  Before it sends a part and after each reply, a
# batch stream gives its core to threads waiting for one (ramster.cores: at most every 0.1 ms), so
# the threads of page calls on the same host, this process's or another's, do not wait for the
# scheduler's tick behind it; the Pages stream never does.
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
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ramster.bulkwire import Parts, in_stream, read_get_batch_reply, read_stream_reply
from ramster.client.errors import (
    DeadlineExceeded,
    PageUnavailable,
    RamsterError,
    ResourceExhausted,
    Unavailable,
    from_code_number,
    from_rpc_error,
    from_status,
)
from ramster.client.messages import (
    GetResult,
    KeyRange,
    Keys,
    decode_get,
    decode_put,
    get_batch_requests,
    object_key,
    page_key,
    page_put_request,
    pool_key,
    put_batch_requests,
)
from ramster.client.tls import PathLike, open_channel
from ramster.cores import CoreYield
from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc
from ramster.wire import Outcome, PageStatus

DEFAULT_TIMEOUT = 30.0
KINDS = {"persistent": pb.POOL_KIND_PERSISTENT, "ephemeral": pb.POOL_KIND_EPHEMERAL}
KIND_NAMES = {v: k for k, v in KINDS.items()}
TMEM = "/" + pb.DESCRIPTOR.services_by_name["Tmem"].full_name + "/"
T = TypeVar("T")


@dataclass(frozen=True)
class PoolInfo:
    pool: int
    kind: str  # "persistent" or "ephemeral"
    allocator: str
    pages: int
    lost: bool = False  # may have lost pages in a crash of the node, until accept_loss()


def pool_infos(pools: Sequence[pb.PoolInfo]) -> list[PoolInfo]:
    return [
        PoolInfo(p.pool, KIND_NAMES.get(p.kind, "persistent"), p.allocator, p.pages, p.lost)
        for p in pools
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
        self._tmem = cast("tmem_pb2_grpc.TmemAsyncStub", tmem_pb2_grpc.TmemStub(self._channel))
        self._health = health_pb2_grpc.HealthStub(self._channel)
        join = b"".join
        self._put_batch = self._channel.unary_unary(
            TMEM + "PutBatch",
            request_serializer=join,
            response_deserializer=pb.PutBatchResponse.FromString,
        )
        self._get_batch = self._channel.unary_unary(
            TMEM + "GetBatch",
            request_serializer=pb.GetBatchRequest.SerializeToString,
            response_deserializer=read_get_batch_reply,
        )
        self._stream = self._channel.stream_stream(
            TMEM + "Stream", request_serializer=join, response_deserializer=read_stream_reply
        )
        self._open_pages = self._channel.stream_stream(
            TMEM + "Pages", request_serializer=join, response_deserializer=read_stream_reply
        )
        self._pages: Stream | None = None  # single-page calls, opened by the first

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pages is not None:
            await self._pages.end()
        await self._channel.close()

    def _call(
        self, rpc: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> Awaitable[T]:
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
        reply = await self._call(self._tmem.CreatePool, request, timeout)
        return int(reply.pool)

    async def destroy_pool(self, pool: int, timeout: float | None = None) -> int:
        """Drop a pool; how many pages it held."""
        reply = await self._call(
            self._tmem.DestroyPool, pb.DestroyPoolRequest(pool=pool_key(pool)), timeout
        )
        return int(reply.pages)

    async def list_pools(self, timeout: float | None = None) -> list[PoolInfo]:
        reply = await self._call(self._tmem.ListPools, pb.ListPoolsRequest(), timeout)
        return pool_infos(reply.pools)

    async def accept_loss(self, pool: int, timeout: float | None = None) -> bool:
        """Take note that a pool marked lost (PoolInfo.lost: the node crashed) lost what it
        lacks: its gets that find no page are misses again.  Whether it was marked."""
        request = pb.AcceptLossRequest(pool=pool_key(pool))
        reply = await self._call(self._tmem.AcceptLoss, request, timeout)
        return bool(reply.lost)

    # -- single pages ------------------------------------------------------------------------
    async def put(
        self, pool: int, oid: int, index: int, page: bytes, timeout: float | None = None
    ) -> Outcome:
        """Store one page.  Raises ResourceExhausted when the node has no room for it."""
        body = page_put_request(pool, oid, index, page)
        (outcome,) = await self._page_call(PUT, body, _put_reply, timeout)
        if outcome is Outcome.REFUSED_NO_ROOM:
            raise ResourceExhausted(
                f"pool {pool} refused page ({oid}, {index}): the node's pool limit is reached"
            )
        return outcome

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
        checked = page_key(pool, oid, index)
        request = pb.GetBatchRequest(
            pool=checked[0], oids=checked[1:2], indexes=checked[2:], exclusive=exclusive
        )
        body = Parts.of(request.SerializeToString())
        result = await self._page_call(GET, body, _get_reply, timeout)
        if result.statuses[0] is PageStatus.UNAVAILABLE:
            raise PageUnavailable(f"pool {pool} page ({oid}, {index}) has no reachable copy")
        return result.pages[0]

    async def flush_page(
        self, pool: int, oid: int, index: int, timeout: float | None = None
    ) -> bool:
        pool, oid, index = page_key(pool, oid, index)
        body = Parts.of(pb.FlushPageRequest(pool=pool, oid=oid, index=index).SerializeToString())
        return await self._page_call(FLUSH_PAGE, body, _flush_page_reply, timeout)

    async def flush_object(self, pool: int, oid: int, timeout: float | None = None) -> int:
        pool, oid = object_key(pool, oid)
        body = Parts.of(pb.FlushObjectRequest(pool=pool, oid=oid).SerializeToString())
        return await self._page_call(FLUSH_OBJECT, body, _flush_object_reply, timeout)

    async def _page_call(
        self, field: int, body: Parts, decode: Decode[T], timeout: float | None
    ) -> T:
        """A single-page call on the client's Pages stream, opened on first use and again
        after it failed; the deadline covers sending the request and its reply."""
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                pages = self._pages
                if pages is None or pages.failed:
                    if pages is not None:
                        await pages.end()
                    pages = self._pages = await Stream(
                        self._open_pages, None, self._metadata
                    ).begin()
                return await (await pages.send(field, body, decode))
        except TimeoutError:
            raise DeadlineExceeded(f"no reply within the deadline ({timeout} s)") from None

    # -- batches -----------------------------------------------------------------------------
    async def put_batch(
        self, pool: int, keys: Keys, pages: Sequence[bytes], timeout: float | None = None
    ) -> list[Outcome]:
        """Store up to 4096 pages; one outcome per page (refusals are outcomes, not errors)."""
        (request,) = put_batch_requests(pool, keys, pages)
        return decode_put(await self._call(self._put_batch, request.chunks, timeout))

    async def get_batch(
        self, pool: int, keys: Keys, exclusive: bool = False, timeout: float | None = None
    ) -> GetResult:
        (request,) = get_batch_requests(pool, keys, exclusive)
        reply, blob = await self._call(self._get_batch, request, timeout)
        return decode_get(reply, blob)

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
        reply: pb.StatsResponse = await self._call(self._tmem.Stats, pb.StatsRequest(), timeout)
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
        return Stream(self._stream, timeout, self._metadata, CoreYield())


Decode = Callable[[pb.StreamResponse, memoryview], T]  # a reply (and its pages) -> a result
R = TypeVar("R")
STREAM_PART_PAGES = 256  # a stream batch goes as requests of at most this many pages


def merged(parts: list[asyncio.Future[T]], combine: Callable[[list[T]], R]) -> asyncio.Future[R]:
    """A future of every part's result, combined in order; the first part to fail fails it
    (every part's error is retrieved, so none is reported as unhandled)."""
    out: asyncio.Future[R] = asyncio.get_running_loop().create_future()
    left = len(parts)

    def done(part: asyncio.Future[T]) -> None:
        nonlocal left
        left -= 1
        error = None if part.cancelled() else part.exception()
        if out.done():
            return
        if part.cancelled():
            out.cancel()
        elif error is not None:
            out.set_exception(error)
        elif left == 0:
            out.set_result(combine([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(done)
    return out


PUT, GET, FLUSH_PAGE, FLUSH_OBJECT = (
    pb.StreamRequest.DESCRIPTOR.fields_by_name[name].number
    for name in ("put", "get", "flush_page", "flush_object")
)


def _put_reply(reply: pb.StreamResponse, _: memoryview) -> list[Outcome]:
    return decode_put(reply.put)


def _get_reply(reply: pb.StreamResponse, blob: memoryview) -> GetResult:
    return decode_get(reply.get, blob)


def _flush_page_reply(reply: pb.StreamResponse, _: memoryview) -> bool:
    return bool(reply.flush_page.found)


def _flush_object_reply(reply: pb.StreamResponse, _: memoryview) -> int:
    return int(reply.flush_object.pages)


class Stream:
    def __init__(
        self,
        open_call: Callable[..., Any],
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] = (),
        cores: CoreYield | None = None,
    ) -> None:
        self._open_call = open_call  # the Stream method, written and read with bulkwire
        self._cores = cores  # a bulk stream's: its parts give the core to waiting threads
        self._timeout = timeout
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: deque[tuple[int, asyncio.Future[Any], Decode[Any]]] = deque()
        self._next_id = 0
        self._failure: RamsterError | None = None
        self._writing = asyncio.Lock()
        self._cancelled = False  # by us, on leaving the block with an exception

    async def __aenter__(self) -> Stream:
        return await self.begin()

    async def begin(self) -> Stream:
        """Open the call and start reading its replies."""
        self._call = self._open_call(timeout=self._timeout, metadata=self._metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def end(self) -> None:
        """Stop sending and wait for the replies due (a failed stream just stops)."""
        with contextlib.suppress(RamsterError):
            await self.__aexit__(None, None, None)

    @property
    def failed(self) -> bool:
        return self._failure is not None

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
        sent = [
            await self.send(PUT, body, _put_reply)
            for body in put_batch_requests(pool, keys, pages, STREAM_PART_PAGES)
        ]
        return merged(sent, lambda parts: [outcome for part in parts for outcome in part])

    async def get_batch(
        self, pool: int, keys: Keys, exclusive: bool = False
    ) -> asyncio.Future[GetResult]:
        """Send a get batch; the returned future resolves to its GetResult."""
        sent = [
            await self.send(GET, Parts.of(request.SerializeToString()), _get_reply)
            for request in get_batch_requests(pool, keys, exclusive, STREAM_PART_PAGES)
        ]
        return merged(sent, GetResult.joined)

    async def flush_object(self, pool: int, oid: int) -> asyncio.Future[int]:
        pool, oid = object_key(pool, oid)
        body = Parts.of(pb.FlushObjectRequest(pool=pool, oid=oid).SerializeToString())
        return await self.send(FLUSH_OBJECT, body, _flush_object_reply)

    async def send(self, field: int, body: Parts, decode: Decode[T]) -> asyncio.Future[T]:
        """Send `body` (a request's parts) as field `field` of the next StreamRequest; the
        future of its reply, decoded.  Senders in several tasks take turns."""
        if self._call is None:
            raise RamsterError("use the stream inside 'async with client.stream() as s'")
        if self._cores is not None:
            self._cores.now()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        async with self._writing:  # requests go out in the order of _pending
            if self._failure is not None:
                raise self._failure
            request_id = self._next_id
            self._next_id += 1
            self._pending.append((request_id, future, decode))
            try:
                await self._call.write(in_stream(request_id, field, body).chunks)
            except grpc.RpcError as exc:
                self._fail(await self._write_failure(exc))
            except asyncio.InvalidStateError:
                self._fail(Unavailable("the stream has ended"))
            except asyncio.CancelledError:  # the request may not have gone: ids would not match
                self._fail(DeadlineExceeded("a request was abandoned while it was being sent"))
                self._call.cancel()
                raise
        return future

    async def _read(self) -> None:
        try:
            async for reply, blob in self._call:
                expected = self._pending[0][0] if self._pending else None
                if reply.id != expected:
                    raise RamsterError(
                        f"stream reply {reply.id} answers no request (expected {expected})",
                        grpc.StatusCode.INTERNAL,
                    )
                _, future, decode = self._pending.popleft()
                if self._cores is not None:
                    self._cores.now()
                if future.done():
                    continue
                if reply.WhichOneof("result") == "error":
                    future.set_exception(from_code_number(reply.error.code, reply.error.message))
                else:
                    try:
                        future.set_result(decode(reply, blob))
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

    async def _write_failure(self, exc: grpc.RpcError) -> RamsterError:
        """Why a write failed: a write that races the server's end of the call (a draining
        node's UNAVAILABLE, say) fails in gRPC's core with only INTERNAL 'Internal error from
        Core', so then the call's own status, which follows, says it."""
        assert self._call is not None
        if exc.code() is grpc.StatusCode.INTERNAL:
            code = await self._call.code()
            if code is not grpc.StatusCode.OK:
                return from_status(code, await self._call.details() or code.name.lower())
        return from_rpc_error(exc)

    def _fail(self, error: RamsterError) -> None:
        if self._failure is None:
            self._failure = error
        while self._pending:
            _, future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
