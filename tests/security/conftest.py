# A holder's peer service and an owner's transport over a real gRPC server on loopback.
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from node.peering import GrpcTransport, Identity, PeerServicer
from node.sealing import Sealer
from ramster.remote import ForeignStore, OwnerTag
from ramster.v1 import peer_pb2_grpc

KEY = bytes(range(32))


@dataclass
class Pair:
    """An owner's transport and a holder's store, over a real gRPC server."""

    transport: GrpcTransport
    holder: ForeignStore
    address: str
    owner: OwnerTag
    servicer: PeerServicer

    async def put(self, pool_id: int, zpages: list[bytes], locations: list[int]) -> list[bool]:
        """Seal zpages and place them on the holder (epoch 1), as the driver does."""
        seal = self.transport.seal
        blobs = [seal(pool_id, loc, z) for loc, z in zip(locations, zpages, strict=True)]
        return await self.transport.put(self.address, 1, pool_id, blobs, locations)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    holder = ForeignStore(4096)
    server = grpc.aio.server()
    servicer = PeerServicer(holder, Identity("holder", "h" * 32))
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    identity = Identity("owner", "o" * 32)
    transport = GrpcTransport(identity, Sealer(KEY, "owner"), timeout=10)
    yield Pair(transport, holder, f"127.0.0.1:{port}", OwnerTag("owner", "o" * 32), servicer)
    await transport.close()
    await server.stop(0)
    holder.close()
