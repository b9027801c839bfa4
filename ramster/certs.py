# Certificates of a RAMster cluster, made with `cryptography` (`ramster certs`, LocalCluster, the
# compose init service): one CA, a certificate per node and per client, ECDSA P-256 keys (cheap
# handshakes) written with mode 0600.
#
# Identity is a URI SAN, spiffe://ramster/<role>/<name>, the way SPIFFE names workloads: a node's
# certificate says spiffe://ramster/node/<node id>, a client's spiffe://ramster/client/<name>.
# One URI names both the role and the member, so the peer listener (node/peering.py) admits a
# caller only when its CA-signed certificate carries a node URI equal to the node id its request
# claims, and a client certificate from the same CA can never call the peer API.  cert-manager
# can issue the same certificates (`uris:`), so nothing here is needed to run a cluster.  Node
# certificates are also server certificates: their DNS/IP SANs cover the addresses that clients
# and peers dial (the node id, localhost, 127.0.0.1, ::1, and --hosts, where {node} stands for
# the node id, e.g. {node}.ramster-peers).  Node certificates also have the clientAuth usage,
# since a node dials its peers with them.
#
# A bundle directory: ca.crt and ca.key, nodes/<id>.crt|.key, clients/<name>.crt|.key.  An
# existing CA in the directory is reused, so running the command again with more names adds
# members to the same cluster; leaf certificates are issued anew each time.  The CA key is kept
# for that reason: in `ca_dir` when given (a place no node can read, as the compose init
# service does), else beside the rest (move it away once the cluster is complete).
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ramster.atomicfile import replace_file

URI_PREFIX = "spiffe://ramster/"
NODE, CLIENT = "node", "client"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
Key = ec.EllipticCurvePrivateKey


class CertError(ValueError):
    """A name, a host or a file of a bundle is not usable."""


@dataclass(frozen=True)
class Member:
    role: str  # NODE or CLIENT
    name: str


@dataclass(frozen=True)
class Bundle:
    ca: Path
    nodes: dict[str, tuple[Path, Path]]  # node id -> (certificate, key)
    clients: dict[str, tuple[Path, Path]]


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf signs handshakes.  Leaves also carry key encipherment:
    meaningless for an EC key, but GnuTLS users such as qemu refuse a leaf whose critical key
    usage lacks it."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def member_uri(role: str, name: str) -> str:
    return f"{URI_PREFIX}{role}/{name}"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise CertError(
            f"{name!r} is not a usable name: 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def member_of(cert: x509.Certificate) -> Member | None:
    """The member a certificate names: its one spiffe://ramster/ URI SAN, else None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    ours = [u[len(URI_PREFIX) :] for u in uris if u.startswith(URI_PREFIX)]
    if len(ours) != 1:
        return None
    role, sep, name = ours[0].partition("/")
    if not sep or role not in (NODE, CLIENT) or not NAME.match(name):
        return None
    return Member(role, name)


@lru_cache(maxsize=1024)
def member_of_pem(pem: bytes) -> Member | None:
    """member_of() a PEM certificate (cached: the peer listener asks once per call)."""
    try:
        return member_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
            raise CertError(f"{host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)


def _new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "RAMster"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: Key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def make_ca(days: int = 3650) -> tuple[Key, x509.Certificate]:
    key = _new_key()
    name = _name(f"RAMster CA {os.urandom(4).hex()}", "ca")
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca: tuple[Key, x509.Certificate],
    role: str,
    name: str,
    hosts: Sequence[str] = (),
    days: int = 365,
) -> tuple[Key, x509.Certificate]:
    """A certificate for member `name` in `role`, signed by the CA; nodes get server SANs."""
    ca_key, ca_cert = ca
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(member_uri(role, name))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == NODE:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names = [name, *LOOPBACK_HOSTS, *(h.replace("{node}", name) for h in hosts)]
        sans += [_san(h) for h in dict.fromkeys(names)]
    cert = (
        _builder(_name(name, role), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, created with `mode` (a key is never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode=mode)


def _save(key: Key, cert: x509.Certificate, cert_path: Path, key_path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_ca(out: Path) -> tuple[Key, x509.Certificate] | None:
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"the CA in {out} cannot be reused: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"the CA key in {out} is not an EC key")
    return key, cert


def make_bundle(
    out: Path,
    nodes: Iterable[str],
    clients: Iterable[str] = (),
    hosts: Sequence[str] = (),
    days: int = 365,
    ca_dir: Path | None = None,
) -> Bundle:
    """Write (or extend) a bundle in `out`: the CA (reused if there, kept in `ca_dir` if
    given, with a copy of ca.crt in `out`), then each leaf."""
    nodes, clients = [check_name(n) for n in nodes], [check_name(c) for c in clients]
    for host in hosts:
        _san(host.replace("{node}", "node"))  # refuse a bad host before writing anything
    ca_dir = ca_dir or out
    ca = _load_ca(ca_dir)
    if ca is None:
        ca = make_ca()
        _save(*ca, ca_dir / "ca.crt", ca_dir / "ca.key")
    _write(out / "ca.crt", ca[1].public_bytes(serialization.Encoding.PEM), 0o644)
    issued: dict[str, dict[str, tuple[Path, Path]]] = {NODE: {}, CLIENT: {}}
    for role, names in ((NODE, nodes), (CLIENT, clients)):
        for name in names:
            paths = (out / f"{role}s" / f"{name}.crt", out / f"{role}s" / f"{name}.key")
            _save(*issue(ca, role, name, hosts, days), *paths)
            issued[role][name] = paths
    return Bundle(out / "ca.crt", issued[NODE], issued[CLIENT])
