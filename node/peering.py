# The ramster layer over gRPC: what a holder serves to owners (PeerServicer, ramster.v1.Peer)
# and what an owner's driver calls (GrpcTransport, one channel per peer address).
#
# Both are thin: the servicer decodes a request, calls the ForeignStore, encodes the reply; the
# transport is the reverse, with a deadline on every call so a frozen or partitioned peer costs a
# timeout, never a hang.  zpages travel as one blob plus a packed list of sizes.  A malformed
# request (sizes that do not add up, mismatched key lists) is INVALID_ARGUMENT; damaged zpages
# inside a well-formed request are simply not stored, and the owner places them elsewhere.
#
# Identity (with TLS): the peer listener is mTLS, and PeerAuthInterceptor, the innermost
# interceptor of that listener, admits a call only if the caller's CA-signed certificate names a
# node (ramster/certs.py: spiffe://ramster/node/<id>; a client certificate is refused) and that
# node is the one the request claims (its owner or sender), else PERMISSION_DENIED before any
# handler runs: a node cannot speak for another.  It wraps every method of the service, so a
# method added later is covered too, and a request that names no node is refused.  The
# transport dials with the node's own certificate when `credentials` is set.
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ramster.certs import NODE, member_of_pem
from ramster.client.wire import (
    CHANNEL_OPTIONS,
    INDEX_LIMIT,
    POOL_LIMIT,
    all_in_range,
    in_range,
)
from ramster.remote import ForeignStore, OwnerTag
from ramster.remote.driver import PeerInfo
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc

T = TypeVar("T")
RECLAIM_CHUNK = 65536  # keys per ReclaimChunk: about 1 MiB
PEER_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name


@dataclass
class Identity:
    """Who this node is to its peers, and whether it is on its way out."""

    node_id: str
    incarnation: str
    leaving: bool = False


def split_zpages(blob: bytes, sizes: list[int]) -> list[bytes]:
    if sum(sizes) != len(blob):
        raise ValueError(f"zpage sizes add up to {sum(sizes)} bytes, the blob has {len(blob)}")
    out = []
    at = 0
    for size in sizes:
        out.append(blob[at : at + size])
        at += size
    return out


def _owner(message: pb.Owner) -> OwnerTag:
    if not message.node_id or not message.incarnation:
        raise ValueError("a peer request must name its owner's node id and incarnation")
    return OwnerTag(message.node_id, message.incarnation)


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, foreign: ForeignStore, identity: Identity) -> None:
        self.foreign = foreign
        self.identity = identity

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
        try:
            return call()
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort() raises; this only tells the type checker

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        me = self.identity
        return pb.HeartbeatResponse(
            node_id=me.node_id,
            incarnation=me.incarnation,
            free_bytes=self.foreign.free_bytes_for(request.sender.node_id),
            leaving=me.leaving,
        )

    async def PutZpages(
        self, request: pb.PutZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutZpagesResponse:
        def put() -> pb.PutZpagesResponse:
            in_range("pool_id", request.pool_id, POOL_LIMIT)
            zpages = split_zpages(request.zpages, list(request.sizes))
            if self.identity.leaving:  # take nothing new on the way out
                return pb.PutZpagesResponse(stored=[False] * len(zpages))
            owner = _owner(request.owner)
            stored = self.foreign.put(owner, request.epoch, request.pool_id, zpages)
            return pb.PutZpagesResponse(stored=stored)

        return await self._run(context, put)

    async def GetZpages(
        self, request: pb.GetZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetZpagesResponse:
        def get() -> pb.GetZpagesResponse:
            if len(request.oids) != len(request.indices):
                raise ValueError("oids and indices must have the same length")
            in_range("pool_id", request.pool_id, POOL_LIMIT)
            all_in_range("indices", request.indices, INDEX_LIMIT)
            keys = list(zip(request.oids, request.indices, strict=True))
            got = self.foreign.get(_owner(request.owner), request.epoch, request.pool_id, keys)
            found = [z or b"" for z in got]
            return pb.GetZpagesResponse(zpages=b"".join(found), sizes=[len(z) for z in found])

        return await self._run(context, get)

    async def Reclaim(
        self, request: pb.ReclaimRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReclaimChunk]:
        keys = await self._run(
            context, lambda: self.foreign.reclaim(_owner(request.owner), request.epoch)
        )
        for start in range(0, len(keys), RECLAIM_CHUNK):
            part = keys[start : start + RECLAIM_CHUNK]
            yield pb.ReclaimChunk(
                pool_ids=[k[0] for k in part],
                oids=[k[1] for k in part],
                indices=[k[2] for k in part],
            )

    async def FlushZpages(
        self, request: pb.FlushZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushZpagesResponse:
        def flush() -> pb.FlushZpagesResponse:
            n = len(request.oids)
            if not len(request.epochs) == len(request.pool_ids) == len(request.indices) == n:
                raise ValueError("epochs, pool_ids, oids and indices must have the same length")
            all_in_range("pool_ids", request.pool_ids, POOL_LIMIT)
            all_in_range("indices", request.indices, INDEX_LIMIT)
            owner = _owner(request.owner)
            flushed = 0
            for epoch, pool_id, oid, index in zip(
                request.epochs, request.pool_ids, request.oids, request.indices, strict=True
            ):
                flushed += self.foreign.flush(owner, epoch, pool_id, [(oid, index)])
            return pb.FlushZpagesResponse(flushed=flushed)

        return await self._run(context, flush)


def claimed_node(request: Any) -> str | None:
    """The node id a peer request speaks for: its `owner` or `sender`."""
    for name in ("owner", "sender"):
        if name in request.DESCRIPTOR.fields_by_name:
            return str(getattr(request, name).node_id)
    return None


class PeerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """On the mTLS peer listener: a call is admitted only from the node it claims to be."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:  # Peer has no request streams
            return handler
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await admit(request, context)
                async for reply in inner_stream(request, context):
                    yield reply

            return handler._replace(unary_stream=stream)
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            await admit(request, context)
            return await inner(request, context)

        return handler._replace(unary_unary=unary)


async def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
    """PERMISSION_DENIED unless the caller's certificate names the node the request claims."""
    pems = context.auth_context().get("x509_pem_cert") or [b""]
    member = member_of_pem(bytes(next(iter(pems))))
    if member is None or member.role != NODE:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the peer API admits node certificates of this cluster only",
        )
        raise AssertionError  # abort() raises; this only tells the type checker
    claimed = claimed_node(request)
    if claimed != member.name:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the certificate of node {member.name!r} cannot speak for node {claimed!r}",
        )


class GrpcTransport:
    """The driver's Transport over ramster.v1.Peer, with a deadline on every call."""

    def __init__(self, identity: Identity, timeout: float = 1.0) -> None:
        self.identity = identity
        self.timeout = timeout
        self.credentials: grpc.ChannelCredentials | None = None  # mTLS: set before the start
        self._stubs: dict[str, peer_pb2_grpc.PeerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = (
                grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS)
                if self.credentials
                else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            )
            self._channels.append(channel)
            stub = self._stubs[address] = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
        return stub

    @property
    def _me(self) -> pb.Owner:
        return pb.Owner(node_id=self.identity.node_id, incarnation=self.identity.incarnation)

    async def heartbeat(self, address: str) -> PeerInfo:
        reply = await self._stub(address).Heartbeat(
            pb.HeartbeatRequest(sender=self._me), timeout=self.timeout
        )
        return PeerInfo(reply.node_id, reply.incarnation, reply.free_bytes, reply.leaving)

    async def put(self, address: str, epoch: int, pool_id: int, zpages: list[bytes]) -> list[bool]:
        reply = await self._stub(address).PutZpages(
            pb.PutZpagesRequest(
                owner=self._me,
                epoch=epoch,
                pool_id=pool_id,
                zpages=b"".join(zpages),
                sizes=[len(z) for z in zpages],
            ),
            timeout=self.timeout * 4,
        )
        if len(reply.stored) != len(zpages):
            raise ValueError(f"peer {address} answered for {len(reply.stored)} of {len(zpages)}")
        return list(reply.stored)

    async def get(
        self, address: str, epoch: int, pool_id: int, keys: list[tuple[int, int]]
    ) -> list[bytes | None]:
        reply = await self._stub(address).GetZpages(
            pb.GetZpagesRequest(
                owner=self._me,
                epoch=epoch,
                pool_id=pool_id,
                oids=[k[0] for k in keys],
                indices=[k[1] for k in keys],
            ),
            timeout=self.timeout,
        )
        zpages = split_zpages(reply.zpages, list(reply.sizes))
        if len(zpages) != len(keys):
            raise ValueError(f"peer {address} answered for {len(zpages)} of {len(keys)} keys")
        return [z or None for z in zpages]

    async def flush(self, address: str, items: list[tuple[int, int, int, int]]) -> None:
        await self._stub(address).FlushZpages(
            pb.FlushZpagesRequest(
                owner=self._me,
                epochs=[i[0] for i in items],
                pool_ids=[i[1] for i in items],
                oids=[i[2] for i in items],
                indices=[i[3] for i in items],
            ),
            timeout=self.timeout * 4,
        )

    async def reclaim(self, address: str, epoch: int) -> set[tuple[int, int, int]]:
        keys: set[tuple[int, int, int]] = set()
        call = self._stub(address).Reclaim(
            pb.ReclaimRequest(owner=self._me, epoch=epoch), timeout=self.timeout * 30
        )
        async for chunk in call:
            if not len(chunk.pool_ids) == len(chunk.oids) == len(chunk.indices):
                raise ValueError(f"peer {address} sent a reclaim chunk of mismatched lists")
            keys.update(zip(chunk.pool_ids, chunk.oids, chunk.indices, strict=True))
        return keys

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
