# Certificate rotation without a restart, on a real node in this process: its TLS files are
# replaced by a new CA's, and the next handshake is served with the new certificate (a client
# of the new CA gets in, one trusting only the old CA no longer does) while the node keeps
# running; a half-written rotation (a key that is not the certificate's) is refused, logged, and
# the node keeps serving what it had.
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from node.server import Node
from node.settings import HostPort
from ramster.certs import Bundle, make_bundle
from ramster.client import AsyncClient, RamsterError
from tests.node.conftest import node_settings


def install(bundle: Bundle, where: Path, key_of: Bundle | None = None) -> None:
    """Put n1's certificate, key (of `key_of` if given) and CA at `where`, each file replaced
    whole (a new inode), as a secret manager or `mv` would."""
    cert = bundle.nodes["n1"][0]
    key = (key_of or bundle).nodes["n1"][1]
    for source, name in ((cert, "n1.crt"), (key, "n1.key"), (bundle.ca, "ca.crt")):
        shutil.copyfile(source, where / f"{name}.new")
        os.replace(where / f"{name}.new", where / name)


@pytest.fixture
async def node(tmp_path: Path, bundle: Bundle) -> AsyncIterator[Node]:
    files = tmp_path / "tls"
    files.mkdir()
    install(bundle, files)
    settings = replace(
        node_settings(tmp_path, peers=(HostPort("127.0.0.1", 1),)),
        node_id="n1",
        tls_cert=files / "n1.crt",
        tls_key=files / "n1.key",
        tls_ca=files / "ca.crt",
    )
    started = Node(settings)
    await started.start()
    yield started
    await started.stop(grace=1)


async def serves(node: Node, ca: Path) -> bool:
    try:
        async with AsyncClient(node.target, timeout=5, tls_ca=ca) as client:
            return await client.health() == "SERVING"
    except RamsterError:
        return False


async def test_new_certificates_are_served_without_a_restart(
    node: Node, bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert await serves(node, bundle.ca)
    rotated = make_bundle(tmp_path / "rotated", ["n1"])
    install(rotated, tmp_path / "tls")
    assert await serves(node, rotated.ca), "the next handshake uses the new certificate"
    assert not await serves(node, bundle.ca), "the old CA's clients no longer trust the node"
    assert node.rotation is not None and node.rotation.version == 1

    caplog.set_level(logging.WARNING)
    again = make_bundle(tmp_path / "again", ["n1"])
    install(again, tmp_path / "tls", key_of=rotated)  # the new key has not arrived yet
    assert not node.rotation.check()
    (refused,) = [r for r in caplog.records if r.getMessage() == "tls_reload_refused"]
    assert "is not the key of --tls-cert" in refused.fields["reason"]  # type: ignore[attr-defined]
    assert await serves(node, rotated.ca), "a broken rotation leaves the node as it was"
    install(again, tmp_path / "tls")
    assert node.rotation.check() and await serves(node, again.ca)
