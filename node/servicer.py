# ramster.v1.Tmem on a ZCache: decode, call the engine, encode.  Nothing else lives here.
#
# Each operation is written once as `request -> response` (raising on failure); the unary RPCs run
# it and abort with the mapped status, and the Stream RPC runs the same operations one request at a
# time, in order, turning a failure into that request's Error reply so the stream survives it.
# Batches are checked whole (size, key and page shapes, quota) before the first engine call, then
# run in parts of at most PART_PAGES pages, each through ChunkedEngine in slices, so no RPC holds
# the event loop or the engine for long.  Pool ids and page indexes travel as uint64: a pool id is
# the public one (node/pools.py: this node's salt above the engine id), mapped back here, and one of
# another node or cut to 32 bits is NOT_FOUND; an index is range-checked (ramster.wire), so one of
# 2**32 or more is INVALID_ARGUMENT, never another page.  A page whose every copy failed
# verification is PAGE_STATUS_CORRUPT in a batch; a unary Get of it fails with DATA_LOSS, the status
# gRPC has for unrecoverable data.  In a pool marked lost after a crash (node/pools.py), a get
# that finds no page answers PAGE_STATUS_LOST in a batch and DATA_LOSS for a unary Get or a
# Pages get, until its owner calls AcceptLoss; ListPools shows the mark.
#
# Every pool belongs to a tenant (node/tenants.py; the interceptor puts the caller's in CALLER): an
# operation on a pool first checks that the caller owns it, and answers NOT_FOUND, word for word as
# for a pool that does not exist, when it does not; ListPools and Stats show the caller's pools
# only, and Stats shows the node-wide counters to operator tenants only (others see their pools'
# pages and how many peers are up).  Quotas (pools, stored pages) are checked before the engine is
# called and answer RESOURCE_EXHAUSTED.
#
# Pages is how AsyncClient makes its single-page calls (get, put, flush_page, flush_object): one
# long-lived stream of StreamRequests, each of one page (or one object's flush), served inline by
# the handler as soon as it is read, the reply written before the next request is read.  A unary
# call through grpc.aio costs the node ~450 us of CPU here (a call set up in C-core, three
# completion-queue events, three asyncio tasks) and the client ~350 us; a message on an open stream
# ~150 us each, so a page call on Pages takes about half the time and CPU of a unary one, and under
# bulk load its tail is shorter too (`ramster bench latency`).  A get there is the unary Get's
# operation (a corrupt page fails with DATA_LOSS and its reason); a batch of more than one page is
# refused (INVALID_ARGUMENT: batches go through Stream).  Each request is announced to
# node.fairness.SmallFirst while it is served.  A Pages stream is open as long as its client, so a
# drain ends every one (node/draining.py): at once if it awaits a request, else once its reply is
# written; it ends with UNAVAILABLE, and the client's next call meets the gate's UNAVAILABLE, as a
# unary one would.  gRPC's metrics count a Pages (or Stream) call once, so each request on it is
# counted and timed here (node.metrics.StreamMetrics).
#
# The stream RPCs (Stream, Pages) and the bulk ones (PutBatch, GetBatch) are served raw
# (add_tmem_to_server): their requests arrive as (keys, a view of the pages in the received bytes)
# and their replies leave as bytes built by ramster.bulkwire, so a 4 MiB batch is never copied
# through protobuf objects; a reply of JOIN_IN_THREAD bytes or more is joined in a thread (the join
# releases the GIL), so the loop serves other calls meanwhile.  A smaller one is joined on the loop:
# a 1 MiB join (a stream part's reply) takes ~0.03 ms, and the thread hop ~0.15 ms more, with two
# loop steps of its own; 4 MiB takes ~0.15 ms warm, 16 MiB ~2 ms.  The rest of the Tmem RPCs are the
# generated, typed servicer methods.
#
# Parts and fairness: every batch, unary or in a stream, goes through the engine in parts of at most
# PART_PAGES pages (the client's stream parts are that size already), and each part takes a turn of
# its client (node/fairness.py: its tenant, or its address without tokens), which runs at most
# CLIENT_PARTS parts at once; so a 4096-page unary batch is sixteen turns, between which the
# client's other work and every other client's go on.  Small calls (single pages, stats, and a batch
# of one page, as a Pages request is) never queue, and while a page fault's call (SMALL, or a Pages
# request) is being served bulk steps wait for it (the interceptor or Pages tells
# node.fairness.SmallFirst of it; ChunkedEngine and the parts here yield through it).  Each page's
# operation is atomic, a batch as a whole is not: a part refused (the pool destroyed meanwhile)
# fails the batch after its earlier parts were applied.
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from node.draining import Drain
from node.engine import ChunkedEngine, Prefetch
from node.fairness import ClientTurns, SmallFirst
from node.metrics import StreamMetrics
from node.pools import Pools
from node.status import RpcFailure, go_code_name, status_of
from node.tenants import CALLER, client_of
from ramster import __version__
from ramster.bulkwire import (
    Parts,
    get_batch_reply,
    in_stream,
    put_batch_reply,
    read_put_batch,
    read_stream_request,
)
from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc
from ramster.wire import Outcome, PageStatus, batch_keys, check_index, page_run
from ramster.zcache import (
    PAGE_SIZE,
    CorruptPage,
    PageError,
    PoolKind,
    PutResult,
    Snapshot,
    ZCache,
    check_keys,
)

WIRE_KIND = {
    PoolKind.PERSISTENT: pb.POOL_KIND_PERSISTENT,
    PoolKind.EPHEMERAL: pb.POOL_KIND_EPHEMERAL,
}
ENGINE_KIND = {
    pb.POOL_KIND_UNSPECIFIED: PoolKind.PERSISTENT,
    pb.POOL_KIND_PERSISTENT: PoolKind.PERSISTENT,
    pb.POOL_KIND_EPHEMERAL: PoolKind.EPHEMERAL,
}
HIT, MISS, LOST = PageStatus.HIT, PageStatus.MISS, PageStatus.LOST
PART_PAGES = 256  # a batch goes through the engine in parts of at most this many pages
CLIENT_PARTS = 2  # parts one client runs in the engine at once
STREAM_AHEAD = 2  # replies a stream serves ahead of the one being sent
JOIN_IN_THREAD = 4 << 20  # replies this big are joined off the loop
RAW = ("PutBatch", "GetBatch", "Stream", "Pages")  # served raw: read and written by bulkwire
# calls served ahead of bulk work (node.fairness.SmallFirst): a page fault's, on one page or object
SMALL = ("Get", "Put", "FlushPage", "FlushObject")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Reply = tuple[Parts, grpc.StatusCode]  # a stream reply and its status, for the metrics
_REPLY_FIELD = {f.name: f.number for f in pb.StreamResponse.DESCRIPTOR.fields}
ONE_PAGE = "a Pages request carries one page (or flushes one object): batches go through Stream"
STREAM_METHODS = {
    "put": "PutBatch",
    "get": "GetBatch",
    "flush_page": "FlushPage",
    "flush_object": "FlushObject",
}


def page_status(page: bytes | PageError | None) -> PageStatus:
    if type(page) is bytes:
        return HIT
    if page is None:
        return MISS
    return PageStatus.CORRUPT if isinstance(page, CorruptPage) else PageStatus.UNAVAILABLE


def page_statuses(pages: list[bytes | PageError | None]) -> list[PageStatus]:
    return [HIT if type(p) is bytes else page_status(p) for p in pages]


async def joined(parts: Parts) -> bytes:
    """A reply's parts as one bytes object; a big one is joined in a thread."""
    if parts.size < JOIN_IN_THREAD:
        return parts.join()
    return await asyncio.to_thread(parts.join)


class TmemServicer(tmem_pb2_grpc.TmemServicer):
    def __init__(
        self,
        engine: ZCache,
        pools: Pools,
        node_id: str,
        prefetch: Prefetch | None = None,
        remote_stats: Callable[[], dict[str, int]] | None = None,
        small_first: SmallFirst | None = None,
        stream_metrics: StreamMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.stream_metrics = stream_metrics  # requests on Stream and Pages calls
        self.pools = pools  # creates and destroys pools in the engine and the registry
        self.chunked = ChunkedEngine(engine, prefetch=prefetch, small_first=small_first)
        self.node_id = node_id
        self.remote_stats = remote_stats  # the ramster layer's counters, with peers
        self.turns = ClientTurns(CLIENT_PARTS)
        self.small_first = small_first
        self.pages = Drain()  # Pages streams, which end when the node drains

    # -- tenants ------------------------------------------------------------------------------
    def _pool(self, pool: int) -> int:
        """The engine id of a pool id from a request, owned by the caller (else NOT_FOUND)."""
        return self.pools.owned(pool, CALLER.get().owner)

    def _room_for(self, pool: int, pages: int) -> int:
        """The caller's pool `pool`, if `pages` more pages keep it within its page quota."""
        pool = self._pool(pool)
        tenant = CALLER.get()
        if tenant.max_pages:
            held = self.engine.pool_pages
            used = sum(held(p) for p in self.pools.owned_by(tenant.owner))
            if used + pages > tenant.max_pages:
                raise RpcFailure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{pages} more pages would pass this tenant's quota of {tenant.max_pages} "
                    f"stored pages ({used} stored)",
                )
        return pool

    # -- operations: request -> response ----------------------------------------------------
    async def _create_pool(self, req: pb.CreatePoolRequest) -> pb.CreatePoolResponse:
        if req.kind not in ENGINE_KIND:
            raise ValueError(f"unknown pool kind {req.kind}")
        tenant = CALLER.get()
        if len(self.pools.owned_by(tenant.owner)) >= tenant.max_pools:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this tenant has its quota of {tenant.max_pools} pools: destroy one first",
            )
        pool = self.pools.create(ENGINE_KIND[req.kind], req.allocator or None, owner=tenant.owner)
        return pb.CreatePoolResponse(pool=self.pools.public(pool))

    async def _destroy_pool(self, req: pb.DestroyPoolRequest) -> pb.DestroyPoolResponse:
        pool = self._pool(req.pool)
        pages = await self.chunked.destroy_pool(pool)
        self.pools.forget(pool)
        return pb.DestroyPoolResponse(pages=pages)

    async def _list_pools(self, req: pb.ListPoolsRequest) -> pb.ListPoolsResponse:
        return pb.ListPoolsResponse(pools=self._pool_infos(self.engine.snapshot()))

    async def _accept_loss(self, req: pb.AcceptLossRequest) -> pb.AcceptLossResponse:
        pool = self._pool(req.pool)
        try:
            return pb.AcceptLossResponse(lost=self.pools.accept_loss(pool))
        except OSError as exc:
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot record that pool {req.pool}'s losses are accepted: {exc.strerror}; "
                "it stays marked lost",
            ) from None

    async def _put(self, req: pb.PutRequest) -> pb.PutResponse:
        index = check_index(req.index)
        result = self.engine.put(self._room_for(req.pool, 1), req.oid, index, req.page)
        if result is Outcome.REFUSED_NO_ROOM:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"pool {req.pool} refused page ({req.oid}, {req.index}): the node's pool limit "
                "is reached",
            )
        return pb.PutResponse(outcome=pb.PutOutcome.ValueType(result))

    async def _get(self, req: pb.GetRequest) -> pb.GetResponse:
        page = await self._get_page(req.pool, req.oid, req.index, req.exclusive)
        if type(page) is bytes:
            return pb.GetResponse(status=pb.PAGE_STATUS_HIT, page=page)
        return pb.GetResponse(status=pb.PageStatus.ValueType(page_status(page)))

    async def _get_page(
        self, pool: int, oid: int, index: int, exclusive: bool
    ) -> bytes | PageError | None:
        """A page fault's get (unary Get, Pages): DATA_LOSS when every copy failed verification,
        or when a pool marked lost by a crash holds no page for the key."""
        key, engine_pool = (oid, check_index(index)), self._pool(pool)
        (page,) = await self.chunked.get_batch(engine_pool, [key], exclusive)
        if isinstance(page, CorruptPage):
            raise RpcFailure(
                grpc.StatusCode.DATA_LOSS,
                f"pool {pool} page ({oid}, {index}) is lost: every copy of it failed "
                f"verification ({page})",
            )
        if page is None and self.pools.lost(engine_pool):
            raise RpcFailure(
                grpc.StatusCode.DATA_LOSS,
                f"pool {pool} holds no page ({oid}, {index}) and may have lost it: the node "
                "crashed since the pool's owner last accepted its losses (AcceptLoss)",
            )
        return page

    async def _flush_page(self, req: pb.FlushPageRequest) -> pb.FlushPageResponse:
        index = check_index(req.index)
        found = self.engine.flush_page(self._pool(req.pool), req.oid, index)
        return pb.FlushPageResponse(found=found)

    async def _flush_object(self, req: pb.FlushObjectRequest) -> pb.FlushObjectResponse:
        pages = await self.chunked.flush_object(self._pool(req.pool), req.oid)
        return pb.FlushObjectResponse(pages=pages)

    async def _put_batch(self, req: pb.PutBatchRequest, blob: memoryview, client: str) -> Parts:
        """A PutBatchResponse's parts."""
        keys = batch_keys(req.oids, req.indexes)
        pool = self._room_for(req.pool, len(keys))
        run = page_run(blob, len(keys))
        check_keys(keys)  # all, before the first part is filed
        if len(keys) == 1:  # a page fault's: no turn to wait for, as a unary Put
            return put_batch_reply(await self.chunked.put_runs(pool, keys, [run]))
        outcomes: list[PutResult] = []
        for part in _parts(len(keys)):
            # the checks above, or the last part, were a step of their own
            await self.chunked.step()
            async with self.turns.turn(client):
                pages = run[part.start * PAGE_SIZE : part.stop * PAGE_SIZE]
                outcomes += await self.chunked.put_runs(pool, keys[part], [pages])
        return put_batch_reply(outcomes)

    async def _get_batch(self, req: pb.GetBatchRequest, client: str) -> Parts:
        """A GetBatchResponse's parts: the statuses, then the hits' pages as the engine gave
        them (joined once, with the reply)."""
        keys = batch_keys(req.oids, req.indexes)
        pool = self._pool(req.pool)
        check_keys(keys)  # all, before the first part is read (an exclusive get removes)
        if len(keys) == 1:  # a page fault's: no turn to wait for, as a unary Get
            pages = await self.chunked.get_batch(pool, keys, req.exclusive)
        else:
            pages = []
            for part in _parts(len(keys)):
                async with self.turns.turn(client):
                    pages += await self.chunked.get_batch(pool, keys[part], req.exclusive)
        statuses = page_statuses(pages)
        if self.pools.lost(pool):  # what it lacks may be what a crash took
            statuses = [LOST if s is MISS else s for s in statuses]
        return get_batch_reply(statuses, [p for p in pages if type(p) is bytes])

    async def _stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        s = self.engine.snapshot()
        remote = self.remote_stats() if self.remote_stats else {}
        if not CALLER.get().operator:  # its own pools only: the totals tell of other tenants
            pools = self._pool_infos(s)
            return pb.StatsResponse(
                node_id=self.node_id,
                version=__version__,
                stored_pages=sum(p.pages for p in pools),
                pools=pools,
                peers=remote.get("peers", 0),
                peers_up=remote.get("peers_up", 0),
            )
        return pb.StatsResponse(
            node_id=self.node_id,
            version=__version__,
            pool_limit_bytes=s.limit_bytes,
            pool_size_bytes=s.size_bytes,
            stored_pages=s.stored_pages,
            zpages=s.zpages,
            pages_per_frame=s.pages_per_frame,
            puts=s.puts,
            gets=s.gets,
            hits=s.hits,
            misses=s.misses,
            duplicate_puts=s.duplicate_puts,
            flushes=s.flushes,
            corrupt=s.corrupt,
            compacted_frames=s.compacted_frames,
            put_outcomes=s.outcome_counts(),
            pools=self._pool_infos(s),
            unavailable=s.unavailable,
            written_back_pages=s.evicted_pages,
            **remote,
        )

    def _pool_infos(self, s: Snapshot) -> list[pb.PoolInfo]:
        """The caller's pools (another tenant's are not even listed)."""
        mine = set(self.pools.owned_by(CALLER.get().owner))
        return [
            pb.PoolInfo(
                pool=self.pools.public(p.id),
                kind=WIRE_KIND[p.kind],
                allocator=p.allocator,
                pages=p.pages,
                lost=self.pools.lost(p.id),
            )
            for p in s.pools
            if p.id in mine
        ]

    # -- RPCs --------------------------------------------------------------------------------
    async def _unary(
        self, op: Callable[[Req], Awaitable[Resp]], req: Req, context: grpc.aio.ServicerContext
    ) -> Resp:
        try:
            return await op(req)
        except Exception as exc:
            code, message = status_of(exc, type(req).__name__.removesuffix("Request"))
        await context.abort(code, message)
        raise AssertionError("abort returned")  # context.abort always raises

    async def CreatePool(
        self, request: pb.CreatePoolRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePoolResponse:
        return await self._unary(self._create_pool, request, context)

    async def DestroyPool(
        self, request: pb.DestroyPoolRequest, context: grpc.aio.ServicerContext
    ) -> pb.DestroyPoolResponse:
        return await self._unary(self._destroy_pool, request, context)

    async def ListPools(
        self, request: pb.ListPoolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPoolsResponse:
        return await self._unary(self._list_pools, request, context)

    async def AcceptLoss(
        self, request: pb.AcceptLossRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcceptLossResponse:
        return await self._unary(self._accept_loss, request, context)

    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        return await self._unary(self._put, request, context)

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        return await self._unary(self._get, request, context)

    async def FlushPage(
        self, request: pb.FlushPageRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushPageResponse:
        return await self._unary(self._flush_page, request, context)

    async def FlushObject(
        self, request: pb.FlushObjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushObjectResponse:
        return await self._unary(self._flush_object, request, context)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        return await self._unary(self._stats, request, context)

    # -- bulk RPCs, served raw -----------------------------------------------------------------
    # Their signatures differ from the generated ones by design (raw requests and replies), so
    # each overrides its generated method with a type: ignore[override].
    async def PutBatch(  # type: ignore[override]
        self, request: tuple[pb.PutBatchRequest, memoryview], context: grpc.aio.ServicerContext
    ) -> bytes:
        """PutBatch: the request read by ramster.bulkwire, the reply's bytes."""
        req, blob = request
        client = _client(context)
        return await self._bulk_unary("PutBatch", self._put_batch(req, blob, client), context)

    async def GetBatch(  # type: ignore[override]
        self, request: pb.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """GetBatch: the reply's bytes."""
        client = _client(context)
        return await self._bulk_unary("GetBatch", self._get_batch(request, client), context)

    async def _bulk_unary(
        self, method: str, op: Awaitable[Parts], context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            return await joined(await op)
        except Exception as exc:
            code, message = status_of(exc, method)
        await context.abort(code, message)
        raise AssertionError("abort returned")  # context.abort always raises

    async def Stream(  # type: ignore[override]
        self,
        requests: AsyncIterator[tuple[pb.StreamRequest, memoryview]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Stream: each request read by ramster.bulkwire, each reply's bytes, in order.  The
        requests are served by a task of their own, up to STREAM_AHEAD replies ahead of the one
        being written, so serving the next request overlaps sending this reply."""
        client = _client(context)
        replies: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: no more requests
        room = asyncio.Semaphore(STREAM_AHEAD)

        async def serve() -> None:
            try:
                async for req, blob in requests:
                    await room.acquire()
                    started = time.perf_counter()
                    reply, code = await self._stream_one(req, blob, client)
                    self._observe("Stream", req, code, started)
                    replies.put_nowait(await joined(reply))
            finally:
                replies.put_nowait(None)

        server = asyncio.create_task(serve())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                room.release()
            await server  # how reading the requests ended: a parse error aborts the call
        finally:
            server.cancel()

    async def Pages(  # type: ignore[override]
        self,
        requests: AsyncIterator[tuple[pb.StreamRequest, memoryview]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Pages: each single-page request served as soon as it is read, its reply's bytes
        written before the next is read; UNAVAILABLE once the node drains (self.pages)."""
        small_first = self.small_first
        while (request := await self.pages.next(requests)) is not None:
            req, blob = request
            if small_first is not None:
                small_first.arrive()
            try:
                started = time.perf_counter()
                parts, code = await self._page_call(req, blob)
                self._observe("Pages", req, code, started)
                reply = parts.join()
            finally:
                if small_first is not None:
                    small_first.leave()
            yield reply
        if self.pages.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")

    async def _page_call(self, req: pb.StreamRequest, blob: memoryview) -> Reply:
        """One Pages request's reply: a get as a unary Get (a corrupt page is DATA_LOSS), the
        rest as in Stream (a one-page put takes no client turn)."""
        which = req.WhichOneof("op")
        if which in ("put", "get") and len(getattr(req, which).indexes) != 1:
            return _error_reply(req.id, grpc.StatusCode.INVALID_ARGUMENT, ONE_PAGE)
        if which != "get":
            return await self._stream_one(req, blob, "")
        get = req.get
        try:
            ((oid, index),) = batch_keys(get.oids, get.indexes)
            page = await self._get_page(get.pool, oid, index, get.exclusive)
        except Exception as exc:
            return _error_reply(req.id, *status_of(exc, "Pages.Get"))
        hits = [page] if type(page) is bytes else []
        reply = get_batch_reply([page_status(page)], hits)
        return in_stream(req.id, _REPLY_FIELD["get"], reply), grpc.StatusCode.OK

    def _observe(
        self, method: str, req: pb.StreamRequest, code: grpc.StatusCode, started: float
    ) -> None:
        if self.stream_metrics is not None:
            op, seconds = req.WhichOneof("op") or "none", time.perf_counter() - started
            self.stream_metrics.observe(method, op, go_code_name(code), seconds)

    async def _stream_one(self, req: pb.StreamRequest, blob: memoryview, client: str) -> Reply:
        which = req.WhichOneof("op")
        try:
            if which == "put":
                body = await self._put_batch(req.put, blob, client)
            elif which == "get":
                body = await self._get_batch(req.get, client)
            elif which == "flush_page":
                body = Parts.of((await self._flush_page(req.flush_page)).SerializeToString())
            elif which == "flush_object":
                body = Parts.of((await self._flush_object(req.flush_object)).SerializeToString())
            else:
                raise ValueError(
                    "a stream request must carry an operation (put, get, flush_page, flush_object)"
                )
        except Exception as exc:
            method = STREAM_METHODS.get(which or "", "Stream")
            return _error_reply(req.id, *status_of(exc, f"Stream.{method}"))
        return in_stream(req.id, _REPLY_FIELD[which], body), grpc.StatusCode.OK


def _error_reply(request_id: int, code: grpc.StatusCode, message: str) -> Reply:
    """A stream reply that fails request `request_id` with `code`, and the code."""
    error = pb.Error(code=code.value[0], message=message)
    return in_stream(request_id, _REPLY_FIELD["error"], Parts.of(error.SerializeToString())), code


def _parts(count: int) -> list[slice]:
    """A batch of `count` pages as the slices of its parts."""
    return [slice(first, first + PART_PAGES) for first in range(0, count, PART_PAGES)]


def _client(context: grpc.aio.ServicerContext) -> str:
    """Whose turns a call's batches take: its tenant, or its address (node.tenants.client_of)."""
    return client_of(CALLER.get(), str(context.peer() or ""))


def _raw(reply: bytes) -> bytes:
    return reply


def add_tmem_to_server(servicer: TmemServicer, server: grpc.aio.Server) -> None:
    """Serve ramster.v1.Tmem: the generated handlers of the small RPCs, and the bulk RPCs with
    ramster.bulkwire's readers and bytes replies."""
    service = pb.DESCRIPTOR.services_by_name["Tmem"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
        if method.name not in RAW
    }
    handlers["PutBatch"] = grpc.unary_unary_rpc_method_handler(
        servicer.PutBatch, request_deserializer=read_put_batch, response_serializer=_raw
    )
    handlers["GetBatch"] = grpc.unary_unary_rpc_method_handler(
        servicer.GetBatch,
        request_deserializer=pb.GetBatchRequest.FromString,
        response_serializer=_raw,
    )
    for name in ("Stream", "Pages"):
        handlers[name] = grpc.stream_stream_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=read_stream_request,
            response_serializer=_raw,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
