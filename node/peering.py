# The ramster layer over gRPC: what a holder serves to owners (PeerServicer, ramster.v1.Peer)
# and what an owner's driver calls (GrpcTransport, one channel per peer address).
#
# Both are thin: the servicer decodes a request, calls the ForeignStore, encodes the reply; the
# transport is the reverse, with a deadline on every call so a frozen or partitioned peer costs a
# timeout, never a hang.  zpages travel as one blob plus a packed list of sizes and their slots.
#
# The servicer trusts nothing a caller sends: every field of every request is checked before the
# store sees it (owner names, slot ranges and list lengths, at most MAX_BATCH_PAGES slots as in
# the client API, each blob's size against what a frame holds, sizes adding up to the blob, no
# slot twice in a put), and a request that fails any check is INVALID_ARGUMENT with nothing changed.
#
# Sealing happens here, in the transport, so the ramster layer keeps handling plain zpages:
# `seal` seals a zpage under the owner's key (node/sealing.py) bound to its pool and location
# (the version) but not to a holder, so the driver seals each zpage once and sends that blob to
# every holder of a copy; put sends the location's slot beside each blob, which the holder files
# it under; get opens what comes back, and a blob that does not open comes back as b"" (a
# damaged copy: the driver counts it and tries the next holder).  A blob no holder takes
# (longer than MAX_SPLIT; a sealed raw page is well under it) is refused without a call, so the
# owner keeps it on its disk.  Calls are cut into batches of MAX_BATCH_PAGES slots, the limit
# the servicer enforces.
# A put's request is written as bytes (`put_request`): protobuf encodes the small fields, and
# the blobs are joined once behind them as the zpages field, never copied through a message
# object (as ramster.bulkwire writes the client API's batches); the holder parses it as usual.
#
# Small fetches (a page fault's single get, up to CALLED_FETCH slots) go on one long-lived
# FetchZpages call per holder (FetchCall), not a unary GetZpages each: a message on an open call
# costs each end about a third of a unary call's CPU through grpc.aio, and a remote single get's
# p50 came down from 2.6x a local one's to 2.0x (`ramster bench cluster`).  Batches stay unary:
# a call's replies are written one after another, while unary calls overlap one's processing
# with another's sending.  The deadline covers each fetch; at the deadline the whole call fails
# (a frozen holder: what waits behind the fetch would wait as long), and the next fetch opens a
# new one.  The holder ends its calls when it drains (node/draining.py), after it has left.
#
# Identity (with TLS): the peer listener is mTLS, and PeerAuthInterceptor, the innermost
# interceptor of that listener, admits a call only if the caller's CA-signed certificate names a
# node (ramster/certs.py: spiffe://ramster/node/<id>; a client certificate is refused) and that
# node is the one the request claims (its owner or sender), else PERMISSION_DENIED before any
# handler runs: a node cannot speak for another.  It wraps every method of the service, so a
# method added later is covered too, and a request that names no node is refused; a request
# stream (FetchZpages) is admitted by its first request, and its handler holds every later one
# to that request's owner.  The
# transport dials with the node's own certificate when `credentials` is set.  The other way
# round, an owner believes the node id a peer's heartbeat claims only once that peer has shown
# a certificate for it: on a new claim the transport redials the address with the claimed id as
# the TLS server name (node certificates carry their id as a DNS name) and heartbeats again, so
# a holder with another node's claim fails the handshake and never becomes a peer; every later
# call goes over that verified channel.  A failed heartbeat forgets the name, so a node replaced
# at an address is learnt afresh.
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from node.draining import Drain
from node.sealing import Sealer
from node.settings import parse_hostport
from ramster.bulkwire import Parts, blobs_field
from ramster.remote import ForeignStore, OwnerTag
from ramster.remote.events import FlushItem
from ramster.remote.foreign import MAX_SPLIT, blob_fits
from ramster.remote.membership import MAX_ADDRESS, MAX_MEMBERS, PeerInfo
from ramster.remote.table import SLOT_LIMIT, slot_of
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc
from ramster.wire import (
    CHANNEL_OPTIONS,
    ENGINE_POOL_LIMIT,
    MAX_BATCH_PAGES,
    all_in_range,
    check_count,
    in_range,
)

T = TypeVar("T")
B = TypeVar("B", bytes, memoryview)  # a blob of zpages, or a view of one
RECLAIM_CHUNK = 65536  # keys per ReclaimChunk: about 1 MiB
CALLED_FETCH = 16  # slots: a fetch this small goes on the holder's FetchZpages call
MAX_NODE_ID = 256  # bytes of an owner's node id
MAX_INCARNATION = 64  # characters of an owner's incarnation (ours are 32 hex digits)
PEER_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name
TARGET_NAME = "grpc.ssl_target_name_override"  # the name the peer's certificate must carry
PUT_ZPAGES = f"/{PEER_SERVICE}/PutZpages"  # called with put_request's bytes


class PeerIdentityError(Exception):
    """A peer's answers disagree about who it is."""


@dataclass
class Identity:
    """Who this node is to its peers, and whether it is on its way out."""

    node_id: str
    incarnation: str
    leaving: bool = False
    address: str = ""  # where our peer API is reached, as we tell peers ("" if unknown)
    told: set[str] = field(default_factory=set)  # nodes that heard us say we are leaving


def valid_address(address: str) -> bool:
    """A peer address as nodes tell each other: HOST:PORT as the settings parse it, port
    1..65535, printable, no spaces, at most MAX_ADDRESS bytes."""
    if len(address.encode()) > MAX_ADDRESS or not address.isprintable() or " " in address:
        return False
    try:
        return parse_hostport(address).port > 0
    except ValueError:
        return False


def split_zpages(blob: B, sizes: list[int]) -> list[B]:
    """`blob` cut at `sizes` (slices of a view are views: no copy)."""
    if sum(sizes) != len(blob):
        raise ValueError(f"zpage sizes add up to {sum(sizes)} bytes, the blob has {len(blob)}")
    out = []
    at = 0
    for size in sizes:
        out.append(blob[at : at + size])
        at += size
    return out


def put_request(
    owner: pb.Owner, epoch: int, pool_id: int, blobs: list[bytes], locations: list[int]
) -> bytes:
    """A PutZpagesRequest written as bytes: protobuf encodes all but the blobs, which follow as
    its zpages field, joined once (through a message object they would be copied twice more,
    setting the field and serialising it, ~0.6 MB per call of a pump pass)."""
    head = pb.PutZpagesRequest(
        owner=owner,
        epoch=epoch,
        pool_id=pool_id,
        sizes=[len(blob) for blob in blobs],
        slots=[slot_of(location) for location in locations],
    ).SerializeToString()
    zpages = blobs_field(pb.PutZpagesRequest.ZPAGES_FIELD_NUMBER, blobs)
    return (Parts.of(head) + zpages).join()


def _owner(message: pb.Owner) -> OwnerTag:
    if not message.node_id or not message.incarnation:
        raise ValueError("a peer request must name its owner's node id and incarnation")
    if len(message.node_id.encode()) > MAX_NODE_ID or len(message.incarnation) > MAX_INCARNATION:
        raise ValueError(
            f"an owner's node id has at most {MAX_NODE_ID} bytes and its incarnation at most "
            f"{MAX_INCARNATION} characters"
        )
    return OwnerTag(message.node_id, message.incarnation)


def _slots(slots: list[int]) -> list[int]:
    """The owner's slots a request names: at most MAX_BATCH_PAGES, each below 2**32."""
    check_count(len(slots))
    all_in_range("slots", slots, SLOT_LIMIT)
    return slots


def _put_items(request: pb.PutZpagesRequest) -> tuple[list[int], list[bytes]]:
    """The slots and blobs of a put, every field checked."""
    sizes = list(request.sizes)
    slots = _slots(list(request.slots))
    if len(sizes) != len(slots):
        raise ValueError(f"a put needs one size per slot: {len(sizes)} sizes, {len(slots)} slots")
    bad = next((size for size in sizes if not blob_fits(size)), None)
    if bad is not None:
        raise ValueError(f"a zpage of {bad} bytes cannot be held: 1 to {MAX_SPLIT} bytes")
    if len(set(slots)) != len(slots):
        raise ValueError("a put names the same slot twice")
    return slots, split_zpages(request.zpages, sizes)


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(
        self,
        foreign: ForeignStore,
        identity: Identity,
        members: Callable[[], list[str]] = list,
        heard_of: Callable[[str], None] = lambda address: None,
    ) -> None:
        self.foreign = foreign
        self.identity = identity
        self.members = members  # the member addresses we see up, for gossip
        self.heard_of = heard_of  # a heartbeat's sender says where it is reached
        self.fetches = Drain()  # FetchZpages calls, which end when the node drains

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
        try:
            return call()
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort() raises; this only tells the type checker

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        def beat() -> pb.HeartbeatResponse:
            me, sender = self.identity, _owner(request.sender)
            if me.leaving:
                me.told.add(sender.node_id)
            if request.address:
                if not valid_address(request.address):
                    raise ValueError(
                        "a heartbeat's address must be HOST:PORT (at most 255 bytes), got "
                        f"{request.address[:64]!r}"
                    )
                self.heard_of(request.address)
            return pb.HeartbeatResponse(
                node_id=me.node_id,
                incarnation=me.incarnation,
                free_bytes=self.foreign.free_bytes_for(sender.node_id),
                leaving=me.leaving,
                address=me.address,
                members=self.members()[:MAX_MEMBERS],
            )

        return await self._run(context, beat)

    async def PutZpages(
        self, request: pb.PutZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutZpagesResponse:
        def put() -> pb.PutZpagesResponse:
            owner = _owner(request.owner)
            in_range("pool_id", request.pool_id, ENGINE_POOL_LIMIT)
            slots, blobs = _put_items(request)
            if self.identity.leaving:  # take nothing new on the way out
                return pb.PutZpagesResponse(stored=[False] * len(blobs))
            stored = self.foreign.put(owner, request.epoch, request.pool_id, slots, blobs)
            return pb.PutZpagesResponse(stored=stored)

        return await self._run(context, put)

    def _get(self, request: pb.GetZpagesRequest) -> pb.GetZpagesResponse:
        owner = _owner(request.owner)
        in_range("pool_id", request.pool_id, ENGINE_POOL_LIMIT)
        slots = _slots(list(request.slots))
        got = self.foreign.get(owner, request.epoch, request.pool_id, slots)
        found = [z or b"" for z in got]
        return pb.GetZpagesResponse(zpages=b"".join(found), sizes=[len(z) for z in found])

    async def GetZpages(
        self, request: pb.GetZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetZpagesResponse:
        return await self._run(context, lambda: self._get(request))

    async def FetchZpages(
        self,
        requests: AsyncIterator[pb.GetZpagesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GetZpagesResponse]:
        """GetZpages, request after request on one call; UNAVAILABLE once the node drains."""
        owner = None
        while (request := await self.fetches.next(requests)) is not None:
            if owner is None:
                owner = request.owner.node_id
            elif request.owner.node_id != owner:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a fetch call speaks for one owner ({owner[:64]!r}), a request named "
                    f"{request.owner.node_id[:64]!r}",
                )
            yield await self._run(context, lambda: self._get(request))
        if self.fetches.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")

    async def Reclaim(
        self, request: pb.ReclaimRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReclaimChunk]:
        copies = await self._run(
            context, lambda: self.foreign.reclaim(_owner(request.owner), request.epoch)
        )
        for start in range(0, len(copies), RECLAIM_CHUNK):
            part = copies[start : start + RECLAIM_CHUNK]
            yield pb.ReclaimChunk(pool_ids=[c[0] for c in part], slots=[c[1] for c in part])

    async def FlushZpages(
        self, request: pb.FlushZpagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushZpagesResponse:
        def flush() -> pb.FlushZpagesResponse:
            owner = _owner(request.owner)
            n = len(_slots(list(request.slots)))
            if not len(request.epochs) == len(request.pool_ids) == n:
                raise ValueError("epochs, pool_ids and slots must have the same length")
            all_in_range("pool_ids", request.pool_ids, ENGINE_POOL_LIMIT)
            groups: dict[tuple[int, int], list[int]] = {}  # one store call per (epoch, pool)
            for epoch, pool_id, slot in zip(
                request.epochs, request.pool_ids, request.slots, strict=True
            ):
                groups.setdefault((epoch, pool_id), []).append(slot)
            flushed = sum(
                self.foreign.flush(owner, *group, slots) for group, slots in groups.items()
            )
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
        if handler is None:
            return handler
        if handler.stream_stream is not None:  # FetchZpages: its handler holds every request
            inner_calls = handler.stream_stream  # to the first one's owner

            async def calls(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async for reply in inner_calls(admitted(requests, context), context):
                    yield reply

            return handler._replace(stream_stream=calls)
        if handler.stream_unary is not None:
            inner_one = handler.stream_unary

            async def one(requests: AsyncIterator[Any], context: Any) -> Any:
                return await inner_one(admitted(requests, context), context)

            return handler._replace(stream_unary=one)
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


async def admitted(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """A request stream whose first request is admitted before it is let through."""
    first = True
    async for request in requests:
        if first:
            await admit(request, context)
            first = False
        yield request


async def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
    """PERMISSION_DENIED unless the caller's certificate names the node the request claims."""
    from ramster.certs import NODE, member_of_pem  # cryptography: only a node with TLS loads it

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


class FetchCall:
    """One FetchZpages call to a holder: requests written in turn, each answered by the next
    reply.  Once anything goes wrong (the call ends, a write fails, a reply answers nothing),
    every request pending on it fails with the same error, and so does every later one."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._pending: deque[asyncio.Future[pb.GetZpagesResponse]] = deque()
        self._writing = asyncio.Lock()
        self.failure: Exception | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def ask(self, request: pb.GetZpagesRequest) -> pb.GetZpagesResponse:
        reply: asyncio.Future[pb.GetZpagesResponse] = asyncio.get_running_loop().create_future()
        async with self._writing:  # requests go out in the order of _pending
            if self.failure is not None:
                raise self.failure
            self._pending.append(reply)
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                self.fail(ConnectionError(f"the fetch call failed: {exc}"))
            except asyncio.CancelledError:  # half a request may have gone: the call is spent
                reply.cancel()
                self.fail(ConnectionError("a fetch was abandoned while it was being sent"))
                raise
        return await reply

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                if not self._pending:
                    raise ConnectionError("the holder sent a reply that answers no request")
                waiting = self._pending.popleft()
                if not waiting.done():  # else its caller gave up on it (a deadline)
                    waiting.set_result(reply)
            self.fail(ConnectionError("the holder ended the fetch call"))
        except grpc.aio.AioRpcError as exc:
            self.fail(ConnectionError(f"the fetch call failed: {exc.code().name}: {exc.details()}"))
        except ConnectionError as exc:
            self.fail(exc)

    def fail(self, failure: Exception) -> None:
        """Fail every pending and later request, and end the call."""
        if self.failure is None:
            self.failure = failure
        while self._pending:
            waiting = self._pending.popleft()
            if not waiting.done():
                waiting.set_exception(self.failure)
        self._call.cancel()


class GrpcTransport:
    """The driver's Transport over ramster.v1.Peer, with a deadline on every call."""

    def __init__(self, identity: Identity, sealer: Sealer, timeout: float = 1.0) -> None:
        self.identity = identity
        self.sealer = sealer
        self.timeout = timeout
        self.credentials: grpc.ChannelCredentials | None = None  # mTLS: set before the start
        self._stubs: dict[str, peer_pb2_grpc.PeerStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._names: dict[str, str] = {}  # address -> the node id its certificate must name
        self._fetches: dict[str, FetchCall] = {}  # address -> its open FetchZpages call
        self._closing: set[asyncio.Task[None]] = set()  # channels redialled away from

    def _stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        stub = self._stubs.get(address)
        if stub is None:
            name = self._names.get(address)
            options = [*CHANNEL_OPTIONS, *([(TARGET_NAME, name)] if name else [])]
            channel = (
                grpc.aio.secure_channel(address, self.credentials, options=options)
                if self.credentials
                else grpc.aio.insecure_channel(address, options=options)
            )
            self._channels[address] = channel
            stub = self._stubs[address] = peer_pb2_grpc.PeerStub(channel)
        return stub

    def use_credentials(self, credentials: grpc.ChannelCredentials) -> None:
        """Dial every peer again with new credentials (a rotated certificate)."""
        self.credentials = credentials
        for address in list(self._channels):
            self._redial(address, self._names.get(address))

    def _fetch_call(self, address: str) -> FetchCall:
        """The open FetchZpages call to `address`, opened anew if it failed."""
        call = self._fetches.get(address)
        if call is None or call.failure is not None:
            call = self._fetches[address] = FetchCall(self._stub(address).FetchZpages())
        return call

    def _redial(self, address: str, name: str | None) -> None:
        """Drop the channel to `address`; the next call dials it expecting `name`."""
        self._stubs.pop(address, None)
        fetches = self._fetches.pop(address, None)
        if fetches is not None:
            fetches.fail(ConnectionError(f"the channel to {address} was redialled"))
        channel = self._channels.pop(address, None)
        if channel is not None:
            # calls still running on it get their deadline's worth of grace, then it is gone
            # (a peer failing its identity check every heartbeat must not pile up channels)
            closing = asyncio.get_running_loop().create_task(channel.close(self.timeout * 4))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        if name is None:
            self._names.pop(address, None)
        else:
            self._names[address] = name

    @property
    def _me(self) -> pb.Owner:
        return pb.Owner(node_id=self.identity.node_id, incarnation=self.identity.incarnation)

    async def heartbeat(self, address: str, verify: bool = True) -> PeerInfo:
        """Who answers at `address`; with TLS and `verify`, only once its certificate names
        that node.  Not verified: a seed heartbeated only to discover members, and a first
        answer that advertises another address (a name in front of several nodes, such as a
        headless Service); those answers come from some node of the cluster CA, which is all
        that discovery needs, and the membership never takes such an address as a member.
        Advertised addresses and member lists that are not HOST:PORT are left out."""
        request = pb.HeartbeatRequest(sender=self._me, address=self.identity.address)
        try:
            reply = await self._stub(address).Heartbeat(request, timeout=self.timeout)
            if (
                verify
                and self.credentials
                and self._names.get(address) != reply.node_id
                and reply.address in ("", address)  # else an alias: never used as a member
            ):
                self._redial(address, reply.node_id)
                claimed = reply.node_id
                reply = await self._stub(address).Heartbeat(request, timeout=self.timeout)
                if reply.node_id != claimed:
                    raise PeerIdentityError(f"peer {address} changed its node id mid-check")
        except (grpc.aio.AioRpcError, PeerIdentityError):
            if address in self._names:  # learn again: the node there may have been replaced
                self._redial(address, None)
            raise
        return PeerInfo(
            reply.node_id,
            reply.incarnation,
            reply.free_bytes,
            reply.leaving,
            reply.address if valid_address(reply.address) else "",
            tuple(a for a in reply.members[:MAX_MEMBERS] if valid_address(a)),
        )

    def seal(self, pool_id: int, location: int, zpage: bytes) -> bytes:
        """`zpage` sealed for its holders: bound to owner, pool and location, not to a holder."""
        return self.sealer.seal(pool_id, location, zpage)

    async def put(
        self, address: str, epoch: int, pool_id: int, blobs: list[bytes], locations: list[int]
    ) -> list[bool]:
        """Place sealed zpages (`seal`'s); per blob whether the peer stored it (False without
        a call for one that no holder takes: longer than MAX_SPLIT)."""
        sendable = [i for i, blob in enumerate(blobs) if blob_fits(len(blob))]
        stored = [False] * len(blobs)
        for start in range(0, len(sendable), MAX_BATCH_PAGES):
            part = sendable[start : start + MAX_BATCH_PAGES]
            self._stub(address)  # dials, if it must
            call = self._channels[address].unary_unary(
                PUT_ZPAGES, response_deserializer=pb.PutZpagesResponse.FromString
            )
            request = put_request(
                self._me, epoch, pool_id, [blobs[i] for i in part], [locations[i] for i in part]
            )
            reply = await call(request, timeout=self.timeout * 4)
            if len(reply.stored) != len(part):
                raise ValueError(f"peer {address} answered for {len(reply.stored)} of {len(part)}")
            for i, ok in zip(part, reply.stored, strict=True):
                stored[i] = ok
        return stored

    async def get(
        self,
        address: str,
        epoch: int,
        pool_id: int,
        locations: list[int],
    ) -> list[bytes | None]:
        """The zpages a peer holds for `locations` (under their slots), opened: None where it
        holds none, b"" where what it holds is not our seal of that version (damaged)."""
        out: list[bytes | None] = []
        open_ = self.sealer.open
        for start in range(0, len(locations), MAX_BATCH_PAGES):
            part = locations[start : start + MAX_BATCH_PAGES]
            request = pb.GetZpagesRequest(
                owner=self._me,
                epoch=epoch,
                pool_id=pool_id,
                slots=[slot_of(location) for location in part],
            )
            if len(part) > CALLED_FETCH:
                reply = await self._stub(address).GetZpages(request, timeout=self.timeout)
            else:
                reply = await self._fetch_on_call(address, request)
            sizes = list(reply.sizes)
            if len(sizes) != len(part):
                raise ValueError(f"peer {address} answered for {len(sizes)} of {len(part)} slots")
            try:
                blobs = split_zpages(memoryview(reply.zpages), sizes)  # opened where they lie
            except ValueError as exc:
                raise ValueError(f"peer {address}: {exc}") from None
            for location, blob in zip(part, blobs, strict=True):
                if not blob:
                    out.append(None)  # not held
                else:  # not our seal of that version: b"", a damaged copy
                    out.append(open_(pool_id, location, blob) or b"")
        return out

    async def _fetch_on_call(
        self, address: str, request: pb.GetZpagesRequest
    ) -> pb.GetZpagesResponse:
        """A small fetch on the FetchZpages call to `address`, within the deadline; at the
        deadline the call fails (a frozen holder: what waits behind this would wait as long)."""
        call = self._fetch_call(address)
        try:
            async with asyncio.timeout(self.timeout):
                return await call.ask(request)
        except TimeoutError:
            failure = TimeoutError(f"no fetch reply from {address} in {self.timeout} s")
            call.fail(failure)
            raise failure from None

    async def flush(self, address: str, items: tuple[FlushItem, ...]) -> None:
        for start in range(0, len(items), MAX_BATCH_PAGES):
            part = items[start : start + MAX_BATCH_PAGES]
            await self._stub(address).FlushZpages(
                pb.FlushZpagesRequest(
                    owner=self._me,
                    epochs=[i.epoch for i in part],
                    pool_ids=[i.pool_id for i in part],
                    slots=[i.slot for i in part],
                ),
                timeout=self.timeout * 4,
            )

    async def reclaim(self, address: str, epoch: int) -> set[tuple[int, int]]:
        copies: set[tuple[int, int]] = set()
        call = self._stub(address).Reclaim(
            pb.ReclaimRequest(owner=self._me, epoch=epoch), timeout=self.timeout * 30
        )
        async for chunk in call:
            if len(chunk.pool_ids) != len(chunk.slots):
                raise ValueError(f"peer {address} sent a reclaim chunk of mismatched lists")
            copies.update(zip(chunk.pool_ids, chunk.slots, strict=True))
        return copies

    async def close(self) -> None:
        for call in self._fetches.values():
            call.fail(ConnectionError("the transport closed"))
        for channel in self._channels.values():
            await channel.close()
        await asyncio.gather(*self._closing)
