# Fixtures of the TLS tests: a cluster's certificates (CA, nodes n1..n3, client alice), a foreign
# CA issuing the very same names (what an attacker with their own CA would hold), and a node on
# loopback in this process with TLS and one peer nobody answers, so its peer listener is up.
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from node.server import Node
from node.settings import HostPort, Settings
from ramster.certs import Bundle, make_bundle
from ramster.wire import CHANNEL_OPTIONS
from tests.node.conftest import node_settings

NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("certs"), NODES, ["alice"])


@pytest.fixture(scope="session")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("foreign"), NODES, ["alice"])


def tls_settings(bundle: Bundle, settings: Settings, node_id: str = "n1") -> Settings:
    cert, key = bundle.nodes[node_id]
    return replace(settings, node_id=node_id, tls_cert=cert, tls_key=key, tls_ca=bundle.ca)


@pytest.fixture
async def tls_node(tmp_path: Path, bundle: Bundle) -> AsyncIterator[Node]:
    settings = node_settings(tmp_path, peers=(HostPort("127.0.0.1", 1),))
    node = Node(tls_settings(bundle, settings))
    await node.start()
    yield node
    await node.stop(grace=1)


def credentials(bundle: Bundle, who: str | None) -> grpc.ChannelCredentials:
    """TLS trusting `bundle`'s CA, showing the certificate of node or client `who` if any."""
    ca = bundle.ca.read_bytes()
    if who is None:
        return grpc.ssl_channel_credentials(ca)
    cert, key = bundle.nodes.get(who) or bundle.clients[who]
    return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())


def channel(target: str, bundle: Bundle, who: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, credentials(bundle, who), options=CHANNEL_OPTIONS)
