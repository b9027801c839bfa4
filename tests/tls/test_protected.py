# Protected mode, the TLS settings, `ramster certs` and `ramster tokens`, with real nodes in this
# process: a node reachable from other hosts without TLS (and, on the client port, tokens)
# refuses to start and says why (client, peer or NBD port), unless --insecure; loopback needs
# nothing; TLS settings come from flags, RAMSTER_* and
# TOML alike, go all three together, and the certificate must name this node.
from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from node.server import Node, StartupError
from node.settings import HostPort, Settings, peer_address, resolve
from node.tenants import load_tenants
from ramster.certs import Bundle, member_of
from ramster.cli.main import main
from ramster.nbd import Export
from tests.node.conftest import node_settings
from tests.tls.conftest import tls_settings

ANY = HostPort("0.0.0.0", 0)


async def start_fails(settings: Settings) -> str:
    node = Node(settings)
    with pytest.raises(StartupError) as err:
        await node.start()
    await node.stop(grace=0)
    return str(err.value)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"listen": ANY}, "--listen 0.0.0.0:0"),
        (
            {"peers": (HostPort("127.0.0.1", 1),), "peer_listen": HostPort("::", 0)},
            "--peer-listen [::]:0",
        ),
        (
            {"nbd_listen": ANY, "nbd_export": (Export("a", 1 << 20),)},
            "--nbd-listen 0.0.0.0:0: without TLS",
        ),
    ],
)
async def test_a_reachable_port_without_tls_refuses_to_start(
    tmp_path: Path, changes: dict[str, object], named: str
) -> None:
    message = await start_fails(replace(node_settings(tmp_path), **changes))  # type: ignore[arg-type]
    assert message.startswith(f"protected mode: {named}") and "--insecure" in message
    assert not (tmp_path / "data").exists(), "nothing is touched before the check"


async def test_a_reachable_client_port_needs_tokens_as_well_as_tls(
    tmp_path: Path, bundle: Bundle
) -> None:
    settings = replace(tls_settings(bundle, node_settings(tmp_path)), listen=ANY)
    message = await start_fails(settings)
    assert message.startswith("protected mode: --listen 0.0.0.0:0 is reachable from other hosts")
    assert "without --tokens" in message and "--insecure" in message
    peers = (HostPort("127.0.0.1", 1),)
    peer_only = replace(settings, listen=HostPort("127.0.0.1", 0), peers=peers, peer_listen=ANY)
    node = Node(peer_only)  # the peer port is protected by mTLS alone
    await node.start()
    await node.stop(grace=0)


async def test_insecure_or_tls_and_tokens_let_it_start(tmp_path: Path, bundle: Bundle) -> None:
    tokens = tmp_path / "tokens.toml"
    assert main(["tokens", "--out", str(tokens), "--tenants", "alice"]) == 0
    for settings in (
        replace(node_settings(tmp_path / "a"), listen=ANY, insecure=True),
        replace(tls_settings(bundle, node_settings(tmp_path / "b")), listen=ANY, tokens=tokens),
    ):
        node = Node(settings)
        await node.start()
        assert node.port
        await node.stop(grace=0)


async def test_node_certificate_must_name_this_node(tmp_path: Path, bundle: Bundle) -> None:
    wrong = replace(tls_settings(bundle, node_settings(tmp_path)), node_id="n2")
    assert "names node 'n1', not node 'n2'" in await start_fails(wrong)
    alice, key = bundle.clients["alice"]
    client_cert = replace(wrong, tls_cert=alice, tls_key=key, node_id="alice")
    assert "names client 'alice'" in await start_fails(client_cert)
    half = replace(node_settings(tmp_path), tls_ca=bundle.ca)
    assert "--tls-cert, --tls-key unset" in await start_fails(half)


def test_tls_settings_from_flags_environment_and_toml(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('tls-cert = "/c/n.crt"\ntls_client_auth = true\npeer-listen = "h:9"\n')
    env = {"RAMSTER_TLS_KEY": "/c/n.key", "RAMSTER_INSECURE": "yes", "RAMSTER_TLS_CA": "/c/x"}
    s = resolve({"tls_ca": "/c/ca.crt"}, env=env, config_file=str(config))
    assert (s.tls_cert, s.tls_key, s.tls_ca) == (
        Path("/c/n.crt"),
        Path("/c/n.key"),
        Path("/c/ca.crt"),
    )
    assert s.tls_client_auth and s.insecure and s.peer_listen == HostPort("h", 9)
    assert peer_address(resolve({"listen": "10.0.0.1:7071"}, env={})) == HostPort("10.0.0.1", 8071)
    assert peer_address(resolve({"listen": "127.0.0.1:0"}, env={})) == HostPort("127.0.0.1", 0)


def test_certs_command_writes_private_keys_and_reuses_its_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--nodes", "a,b", "--hosts", "{node}.peers"]) == 0
    ca = (out / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(out), "--nodes", "c", "--clients", "ops"]) == 0
    assert (out / "ca.crt").read_bytes() == ca, "a second run extends the same cluster"
    for key in [out / "ca.key", *out.glob("*/*.key")]:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate((out / "nodes" / "a.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"a", "localhost", "a.peers"} <= set(sans.get_values_for_type(x509.DNSName))
    ops = x509.load_pem_x509_certificate((out / "clients" / "ops.crt").read_bytes())
    assert member_of(ops) is not None and member_of(ops).role == "client"  # type: ignore[union-attr]
    assert main(["certs", "--out", str(out), "--nodes", "../evil"]) == 2
    assert "not a usable name" in capsys.readouterr().err


def test_tokens_command_writes_private_files_a_node_and_the_cli_accept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls" / "tokens.toml"
    made = ["tokens", "--out", str(out), "--tenants", "alice,bob", "--operators", "bob"]
    assert main([*made, "--pools", "3"]) == 0
    printed = capsys.readouterr().out
    alice = (tmp_path / "tls" / "tenants" / "alice.token").read_text().strip()
    assert len(alice) >= 40 and alice not in printed, "tokens are never printed"
    for path in (out, *out.parent.glob("tenants/*.token")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    tenants = load_tenants(out, max_pools=64)
    caller = tenants.authenticate([("authorization", f"Bearer {alice}")])
    assert caller is not None and (caller.name, caller.max_pools, caller.operator) == (
        "alice",
        3,
        False,
    )
    bob = (tmp_path / "tls" / "tenants" / "bob.token").read_text().strip()
    assert tenants.authenticate([("authorization", f"Bearer {bob}")]).operator  # type: ignore[union-attr]
    assert main(["tokens", "--out", str(out), "--tenants", "carol"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert main(["tokens", "--out", str(tmp_path / "x"), "--tenants", "a/b"]) == 2
    assert "not a usable name" in capsys.readouterr().err
