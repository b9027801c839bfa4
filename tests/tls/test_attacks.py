# What an attacker on the network meets at a node with TLS: real nodes on loopback, real
# handshakes.  A client without the cluster CA, or trusting another CA, or speaking plaintext,
# never gets an answer; on the peer listener, no certificate, a certificate of a foreign CA with
# the right name, a client certificate of the cluster's own CA, and a node certificate claiming
# another node's id are all turned away before any handler runs, while the node's rightful
# peers are served.  The owner and sender fields of every Peer request are checked.  The other
# way round, an owner does not believe a holder's claimed node id without its certificate.
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from node.peering import GrpcTransport, Identity
from node.sealing import Sealer
from node.server import Node
from ramster.certs import Bundle
from ramster.client import AsyncClient, RamsterError, Unavailable
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc
from tests.node.conftest import node_settings
from tests.tls.conftest import channel, credentials, tls_settings

DENIED = grpc.StatusCode.PERMISSION_DENIED


def owner(node_id: str) -> pb.Owner:
    return pb.Owner(node_id=node_id, incarnation="i1")


async def test_tls_client_with_the_ca_is_served(tls_node: Node, bundle: Bundle) -> None:
    async with AsyncClient(tls_node.target, timeout=10, tls_ca=bundle.ca) as client:
        pool = await client.create_pool()
        await client.put(pool, 1, 2, b"x" * 4096)
        assert await client.get(pool, 1, 2) == b"x" * 4096
        assert await client.health() == "SERVING"


@pytest.mark.parametrize("how", ["plaintext", "foreign CA", "system roots"])
async def test_client_without_the_ca_fails_the_handshake(
    tls_node: Node, foreign: Bundle, how: str
) -> None:
    tls = {"plaintext": {}, "foreign CA": {"tls_ca": foreign.ca}}.get(how)
    if tls is None:  # TLS, but trusting only the system's CAs
        cert, key = foreign.clients["alice"]
        tls = {"tls_cert": cert, "tls_key": key}
    async with AsyncClient(tls_node.target, timeout=5, **tls) as client:
        with pytest.raises(Unavailable):
            await client.health()


async def test_a_node_certificate_of_a_foreign_ca_is_refused_by_a_client(
    tmp_path: Path, bundle: Bundle, foreign: Bundle
) -> None:
    """The other way round: a client of the cluster will not talk to an impostor node that
    holds a certificate with the right name from another CA."""
    impostor = Node(tls_settings(foreign, node_settings(tmp_path)))
    await impostor.start()
    try:
        async with AsyncClient(impostor.target, timeout=5, tls_ca=bundle.ca) as client:
            with pytest.raises(Unavailable):
                await client.health()
    finally:
        await impostor.stop(grace=0)


async def test_peer_listener_serves_its_rightful_peer(tls_node: Node, bundle: Bundle) -> None:
    async with channel(tls_node.peer_target, bundle, "n2") as ch:
        stub = peer_pb2_grpc.PeerStub(ch)  # type: ignore[no-untyped-call]
        reply = await stub.Heartbeat(pb.HeartbeatRequest(sender=owner("n2")), timeout=5)
        assert reply.node_id == "n1"
        reclaim = stub.Reclaim(pb.ReclaimRequest(owner=owner("n2"), epoch=1), timeout=5)
        assert [chunk async for chunk in reclaim] == []


@pytest.mark.parametrize(
    ("who", "why"),
    [
        ("alice", "node certificates of this cluster only"),  # a client of the cluster's own CA
        ("n3", "cannot speak for node 'n2'"),  # a node speaking for another
    ],
)
async def test_peer_api_refuses_who_is_not_the_claimed_node(
    tls_node: Node, bundle: Bundle, who: str, why: str
) -> None:
    async with channel(tls_node.peer_target, bundle, who) as ch:
        stub = peer_pb2_grpc.PeerStub(ch)  # type: ignore[no-untyped-call]
        calls = [
            stub.Heartbeat(pb.HeartbeatRequest(sender=owner("n2")), timeout=5),
            stub.PutZpages(
                pb.PutZpagesRequest(owner=owner("n2"), epoch=1, zpages=b"z", sizes=[1]), timeout=5
            ),
            stub.GetZpages(pb.GetZpagesRequest(owner=owner("n2"), epoch=1, slots=[1]), timeout=5),
            stub.FlushZpages(pb.FlushZpagesRequest(owner=owner("n2")), timeout=5),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is DENIED
            assert why in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [c async for c in stub.Reclaim(pb.ReclaimRequest(owner=owner("n2")), timeout=5)]
        assert err.value.code() is DENIED
        fetch = pb.GetZpagesRequest(owner=owner("n2"), epoch=1, slots=[1])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [c async for c in stub.FetchZpages(iter([fetch]), timeout=5)]
        assert err.value.code() is DENIED
        assert why in (err.value.details() or "")
    assert tls_node.remote is not None and tls_node.remote.foreign.pages == 0


@pytest.mark.parametrize("how", ["no certificate", "foreign CA", "plaintext"])
async def test_peer_listener_needs_a_certificate_of_the_cluster_ca(
    tls_node: Node, bundle: Bundle, foreign: Bundle, how: str
) -> None:
    if how == "plaintext":
        ch = grpc.aio.insecure_channel(tls_node.peer_target)
    elif how == "no certificate":
        ch = channel(tls_node.peer_target, bundle)
    else:  # the right name from another CA, trusting ours to get past the server check
        cert, key = foreign.nodes["n2"]
        creds = grpc.ssl_channel_credentials(
            bundle.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        ch = grpc.aio.secure_channel(tls_node.peer_target, creds)
    async with ch:
        stub = peer_pb2_grpc.PeerStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sender=owner("n2")), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake failed


async def test_client_port_does_not_serve_the_peer_api(tls_node: Node, bundle: Bundle) -> None:
    async with channel(tls_node.target, bundle, "n2") as ch:
        stub = peer_pb2_grpc.PeerStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sender=owner("n2")), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_client_certificates_when_the_node_requires_them(
    tmp_path: Path, bundle: Bundle
) -> None:
    node = Node(replace(tls_settings(bundle, node_settings(tmp_path)), tls_client_auth=True))
    await node.start()
    try:
        async with AsyncClient(node.target, timeout=5, tls_ca=bundle.ca) as anonymous:
            with pytest.raises(RamsterError):
                await anonymous.health()
        cert, key = bundle.clients["alice"]
        async with AsyncClient(
            node.target, timeout=5, tls_ca=bundle.ca, tls_cert=cert, tls_key=key
        ) as alice:
            assert await alice.health() == "SERVING"
    finally:
        await node.stop(grace=0)


class Impostor(peer_pb2_grpc.PeerServicer):  # type: ignore[misc]
    """A holder with a valid node certificate (n3's) whose heartbeat claims to be n1."""

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: object
    ) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(node_id="n1", incarnation="i" * 32, free_bytes=1 << 30)


async def test_an_owner_believes_a_holders_node_id_only_from_its_certificate(
    tls_node: Node, bundle: Bundle
) -> None:
    cert, key = bundle.nodes["n3"]
    server = grpc.aio.server()
    peer_pb2_grpc.add_PeerServicer_to_server(Impostor(), server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], bundle.ca.read_bytes(), True
    )
    impostor = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', creds)}"
    await server.start()
    transport = GrpcTransport(Identity("n2", "i" * 32), Sealer(bytes(32), "n2"), timeout=5)
    transport.credentials = credentials(bundle, "n2")
    try:
        for _ in range(2):  # and again over the verified channel
            assert (await transport.heartbeat(tls_node.peer_target)).node_id == "n1"
        for _ in range(2):  # a failed check is not remembered as a success
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await transport.heartbeat(impostor)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await transport.close()
        await server.stop(0)
