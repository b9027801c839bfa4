# ramster.v1.Tmem on a ZCache: decode, call the engine, encode.  Nothing else lives here.
#
# Each operation is written once as `request -> response` (raising on failure); the unary RPCs
# run it and abort with the mapped status, and the Stream RPC runs the same operations one
# request at a time, in order, turning a failure into that request's Error reply so the stream
# survives it.  Batches are checked whole (size, key and page shapes) before the first engine
# call, then run through ChunkedEngine so no RPC holds the event loop for long.  Pool ids and page
# indexes travel as uint64: a pool id is the public one (node/pools.py: this node's salt above
# the engine id), mapped back here, and one of another node or cut to 32 bits is NOT_FOUND;
# an index is range-checked (ramster.client.wire), so one of 2**32 or more is INVALID_ARGUMENT,
# never another page.  A page
# whose every copy failed verification is PAGE_STATUS_CORRUPT in a batch; a unary Get of it
# fails with DATA_LOSS, the status gRPC has for unrecoverable data.
#
# Every pool belongs to a tenant (node/tenants.py; the interceptor puts the caller's in CALLER):
# an operation on a pool first checks that the caller owns it, and answers NOT_FOUND, word for
# word as for a pool that does not exist, when it does not; ListPools and Stats show the caller's
# pools only, and Stats shows the node-wide counters to operator tenants only (others see their
# pools' pages and how many peers are up).  Quotas (pools,
# stored pages) are checked before the engine is called and answer RESOURCE_EXHAUSTED.
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from node.engine import ChunkedEngine, Prefetch
from node.pools import Pools
from node.status import RpcFailure, status_of
from node.tenants import CALLER
from ramster import __version__
from ramster.client.wire import batch_keys, check_index, split_pages
from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc
from ramster.zcache import CorruptPage, PageError, PoolKind, PutResult, Snapshot, ZCache

_OUTCOMES = {
    PutResult.STORED: pb.PUT_OUTCOME_STORED,
    PutResult.SAME_FILLED: pb.PUT_OUTCOME_SAME_FILLED,
    PutResult.STORED_RAW: pb.PUT_OUTCOME_STORED_RAW,
    PutResult.REFUSED_POOR_COMPRESSION: pb.PUT_OUTCOME_REFUSED_POOR_COMPRESSION,
    PutResult.REFUSED_NO_ROOM: pb.PUT_OUTCOME_REFUSED_NO_ROOM,
}
WIRE_OUTCOME = tuple(_OUTCOMES[r] for r in PutResult)  # indexed by PutResult (a tuple is fastest)
WIRE_KIND = {
    PoolKind.PERSISTENT: pb.POOL_KIND_PERSISTENT,
    PoolKind.EPHEMERAL: pb.POOL_KIND_EPHEMERAL,
}
ENGINE_KIND = {
    pb.POOL_KIND_UNSPECIFIED: PoolKind.PERSISTENT,
    pb.POOL_KIND_PERSISTENT: PoolKind.PERSISTENT,
    pb.POOL_KIND_EPHEMERAL: PoolKind.EPHEMERAL,
}
HIT, MISS = pb.PAGE_STATUS_HIT, pb.PAGE_STATUS_MISS

Operation = Callable[[Any], Awaitable[Any]]


def page_status(page: bytes | PageError | None) -> pb.PageStatus:
    if type(page) is bytes:
        return HIT
    if page is None:
        return MISS
    return pb.PAGE_STATUS_CORRUPT if isinstance(page, CorruptPage) else pb.PAGE_STATUS_UNAVAILABLE


def page_statuses(pages: list[bytes | PageError | None]) -> list[pb.PageStatus]:
    return [HIT if type(p) is bytes else page_status(p) for p in pages]


class TmemServicer(tmem_pb2_grpc.TmemServicer):
    def __init__(
        self,
        engine: ZCache,
        pools: Pools,
        node_id: str,
        prefetch: Prefetch | None = None,
        remote_stats: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.engine = engine
        self.pools = pools  # creates and destroys pools in the engine and the registry
        self.chunked = ChunkedEngine(engine, prefetch=prefetch)
        self.node_id = node_id
        self.remote_stats = remote_stats  # the ramster layer's counters, with peers
        self._stream_ops: dict[str, tuple[str, Operation]] = {
            "put": ("PutBatch", self._put_batch),
            "get": ("GetBatch", self._get_batch),
            "flush_page": ("FlushPage", self._flush_page),
            "flush_object": ("FlushObject", self._flush_object),
        }

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

    async def _put(self, req: pb.PutRequest) -> pb.PutResponse:
        index = check_index(req.index)
        result = self.engine.put(self._room_for(req.pool, 1), req.oid, index, req.page)
        if result is PutResult.REFUSED_NO_ROOM:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"pool {req.pool} refused page ({req.oid}, {req.index}): the node's pool limit "
                "is reached",
            )
        return pb.PutResponse(outcome=WIRE_OUTCOME[result])

    async def _get(self, req: pb.GetRequest) -> pb.GetResponse:
        key = (req.oid, check_index(req.index))
        pool = self._pool(req.pool)
        (page,) = await self.chunked.get_batch(pool, [key], req.exclusive)
        if type(page) is bytes:
            return pb.GetResponse(status=HIT, page=page)
        if isinstance(page, CorruptPage):
            raise RpcFailure(
                grpc.StatusCode.DATA_LOSS,
                f"pool {req.pool} page ({req.oid}, {req.index}) is lost: every copy of it failed "
                f"verification ({page})",
            )
        return pb.GetResponse(status=page_status(page))

    async def _flush_page(self, req: pb.FlushPageRequest) -> pb.FlushPageResponse:
        index = check_index(req.index)
        found = self.engine.flush_page(self._pool(req.pool), req.oid, index)
        return pb.FlushPageResponse(found=found)

    async def _flush_object(self, req: pb.FlushObjectRequest) -> pb.FlushObjectResponse:
        return pb.FlushObjectResponse(pages=self.engine.flush_object(self._pool(req.pool), req.oid))

    async def _put_batch(self, req: pb.PutBatchRequest) -> pb.PutBatchResponse:
        keys = batch_keys(req.oids, req.indexes)
        pool = self._room_for(req.pool, len(keys))
        pages = split_pages(req.pages, len(keys))
        results = await self.chunked.put_batch(pool, keys, pages)
        return pb.PutBatchResponse(outcomes=[WIRE_OUTCOME[r] for r in results])

    async def _get_batch(self, req: pb.GetBatchRequest) -> pb.GetBatchResponse:
        keys = batch_keys(req.oids, req.indexes)
        pages = await self.chunked.get_batch(self._pool(req.pool), keys, req.exclusive)
        hits = b"".join([p for p in pages if type(p) is bytes])
        return pb.GetBatchResponse(statuses=page_statuses(pages), pages=hits)

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
            )
            for p in s.pools
            if p.id in mine
        ]

    # -- RPCs --------------------------------------------------------------------------------
    async def _unary(self, op: Operation, method: str, req: Any, context: Any) -> Any:
        try:
            return await op(req)
        except Exception as exc:
            code, message = status_of(exc, method)
        await context.abort(code, message)

    async def CreatePool(self, req: pb.CreatePoolRequest, context: Any) -> Any:
        return await self._unary(self._create_pool, "CreatePool", req, context)

    async def DestroyPool(self, req: pb.DestroyPoolRequest, context: Any) -> Any:
        return await self._unary(self._destroy_pool, "DestroyPool", req, context)

    async def ListPools(self, req: pb.ListPoolsRequest, context: Any) -> Any:
        return await self._unary(self._list_pools, "ListPools", req, context)

    async def Put(self, req: pb.PutRequest, context: Any) -> Any:
        return await self._unary(self._put, "Put", req, context)

    async def Get(self, req: pb.GetRequest, context: Any) -> Any:
        return await self._unary(self._get, "Get", req, context)

    async def FlushPage(self, req: pb.FlushPageRequest, context: Any) -> Any:
        return await self._unary(self._flush_page, "FlushPage", req, context)

    async def FlushObject(self, req: pb.FlushObjectRequest, context: Any) -> Any:
        return await self._unary(self._flush_object, "FlushObject", req, context)

    async def PutBatch(self, req: pb.PutBatchRequest, context: Any) -> Any:
        return await self._unary(self._put_batch, "PutBatch", req, context)

    async def GetBatch(self, req: pb.GetBatchRequest, context: Any) -> Any:
        return await self._unary(self._get_batch, "GetBatch", req, context)

    async def Stats(self, req: pb.StatsRequest, context: Any) -> Any:
        return await self._unary(self._stats, "Stats", req, context)

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        async for req in requests:
            yield await self._stream_one(req)

    async def _stream_one(self, req: pb.StreamRequest) -> pb.StreamResponse:
        which = req.WhichOneof("op")
        if which is None:
            return pb.StreamResponse(
                id=req.id,
                error=pb.Error(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    message="a stream request must carry an operation (put, get, flush_page, "
                    "flush_object)",
                ),
            )
        method, op = self._stream_ops[which]
        try:
            reply = await op(getattr(req, which))
        except Exception as exc:
            code, message = status_of(exc, f"Stream.{method}")
            return pb.StreamResponse(id=req.id, error=pb.Error(code=code.value[0], message=message))
        return pb.StreamResponse(id=req.id, **{which: reply})
