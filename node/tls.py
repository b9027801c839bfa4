# The node's transport security: its TLS material, the credentials of its two gRPC listeners,
# and protected mode.
#
# --tls-cert/--tls-key/--tls-ca go together (all or none).  The certificate must be a node
# certificate naming this node id (ramster/certs.py: a spiffe://ramster/node/<id> URI SAN),
# checked at start, since peers would refuse it on every call otherwise.  With TLS the client
# listener serves TLS (client certificates required only with --tls-client-auth) and the peer
# listener always requires a client certificate signed by the CA; what the certificate names
# is then checked per call by node/peering.py's PeerAuthInterceptor.
#
# Rotation without a restart (Rotation): both listeners serve dynamic credentials whose fetcher
# gRPC calls before each new handshake; it re-reads the three files when their stat (mtime, size,
# inode) changed, and serves the new material only if it passes the same checks as at start
# (names this node, key matches certificate), else logs why and keeps the old.  The node also
# checks every ROTATION_CHECK seconds and on SIGHUP, and then redials its peers with the new
# certificate.  Connections already open keep the session they have.  Trade-off: a stat of three
# files per handshake (handshakes are rare: channels are long-lived).
#
# Protected mode, as Redis 7: a listener on an address other hosts can reach (anything but
# 127.0.0.0/8, ::1 and "localhost") is refused at start unless it is protected, or --insecure
# says the operator knows.  The client port is protected by TLS *and* tokens (--tokens: without
# them anyone who can reach it could read and write every pool); the peer port by TLS, which
# there always means mTLS with the cluster's node certificates; the NBD port by TLS with client
# certificates (--tls-client-auth: NBD has no tokens, so the certificate is what tells a client
# of the cluster from anyone; with TLS the port requires STARTTLS, node/nbd/).  Loopback needs
# nothing, so a bare node and `ramster demo` stay zero-configuration.  The cryptography package
# (~8 MiB of RSS, with ramster/certs.py) is imported only where TLS is configured.
from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from node.logs import log_event
from node.settings import HostPort, Settings

ROTATION_CHECK = 30.0  # seconds between checks of the TLS files for a rotation


@dataclass(frozen=True)
class NodeTls:
    cert: bytes
    key: bytes
    ca: bytes
    client_auth: bool

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What the node dials its peers with: the CA, and its own certificate as identity."""
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def load_tls(settings: Settings) -> NodeTls | None:
    """The node's TLS material, or None without --tls-*; ValueError says what is wrong."""
    paths = {"--tls-cert": settings.tls_cert, "--tls-key": settings.tls_key}
    paths["--tls-ca"] = settings.tls_ca
    given = [flag for flag, path in paths.items() if path is not None]
    if not given:
        if settings.tls_client_auth:
            raise ValueError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
        return None
    if len(given) < len(paths):
        missing = ", ".join(flag for flag in paths if flag not in given)
        raise ValueError(f"TLS needs --tls-cert, --tls-key and --tls-ca together: {missing} unset")
    data = {}
    for flag, path in paths.items():
        try:
            data[flag] = path.read_bytes() if path else b""
        except OSError as exc:
            raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not key_matches(data["--tls-cert"], data["--tls-key"]):
        raise ValueError(
            f"--tls-key {settings.tls_key} is not the key of --tls-cert {settings.tls_cert}"
        )
    from ramster.certs import NODE, member_of_pem  # cryptography: only a node with TLS loads it

    member = member_of_pem(data["--tls-cert"])
    if member is None or member.role != NODE or member.name != settings.node_id:
        named = f"{member.role} {member.name!r}" if member else "no RAMster member"
        raise ValueError(
            f"--tls-cert {settings.tls_cert} names {named}, not node {settings.node_id!r}: "
            f"peers would refuse it (make one with `ramster certs --nodes {settings.node_id}`)"
        )
    return NodeTls(
        data["--tls-cert"], data["--tls-key"], data["--tls-ca"], settings.tls_client_auth
    )


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the PEM key is the private key of the PEM certificate (False if either is not
    PEM of its kind)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        cert.public_key().public_bytes(der, public) == key.public_key().public_bytes(der, public)
    )


def _stamp(settings: Settings) -> tuple[tuple[int, int, int] | None, ...]:
    stamps: list[tuple[int, int, int] | None] = []
    for path in (settings.tls_cert, settings.tls_key, settings.tls_ca):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
    return tuple(stamps)


class Rotation:
    """The node's TLS material, re-read when its files change (see the header)."""

    def __init__(self, settings: Settings, tls: NodeTls) -> None:
        self.settings = settings
        self.current = tls
        self.version = 0  # bumped by each accepted change
        self.on_change: list[Callable[[NodeTls], None]] = []
        self._stamp = _stamp(settings)
        self._lock = threading.Lock()  # the fetchers run on gRPC's threads

    def check(self) -> bool:
        """Re-read the files if they changed; True when new material was taken."""
        with self._lock:
            stamp = _stamp(self.settings)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                tls = load_tls(self.settings)
            except ValueError as exc:
                log_event("tls_reload_refused", logging.WARNING, reason=str(exc))
                return False
            if tls is None:
                return False
            self.current = tls
            self.version += 1
        log_event("tls_reloaded", version=self.version)
        for changed in self.on_change:
            changed(tls)
        return True

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        served = self.version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            self.check()
            if self.version == served:
                return None
            served = self.version
            return _configuration(self.current)

        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.current), fetch, require_client_cert
        )


def _configuration(tls: NodeTls) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(tls.key, tls.cert)], tls.ca)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_protected(
    settings: Settings, tls: NodeTls | None, tokens: bool, peer: HostPort | None
) -> None:
    """Refuse (ValueError) a reachable listener that nothing protects, unless --insecure."""
    if settings.insecure:
        return
    nbd = settings.nbd_listen
    if not isinstance(nbd, HostPort):  # none, or a Unix socket: this host only, mode 0600
        nbd = None
    if nbd is not None and not is_loopback(nbd.host) and tls is None:
        raise ValueError(
            f"protected mode: --nbd-listen {nbd}: without TLS, NBD is served on loopback "
            "addresses only (127.0.0.1, ::1) unless --insecure; block devices would cross the "
            "network in clear text: set --tls-cert, --tls-key, --tls-ca and --tls-client-auth "
            "(NBD then requires STARTTLS, nbds:// URIs), or reach it through an SSH tunnel"
        )
    if nbd is not None and not is_loopback(nbd.host) and tls and not tls.client_auth:
        raise ValueError(
            f"protected mode: --nbd-listen {nbd} is reachable from other hosts without "
            "--tls-client-auth: NBD has no tokens, so only a client certificate signed by "
            "--tls-ca keeps anyone who can reach the port from reading and overwriting every "
            "export; set --tls-client-auth, listen on 127.0.0.1, or pass --insecure if the "
            "network is trusted"
        )
    advice = (
        "(`ramster certs` makes the TLS files, `ramster tokens` a tokens file), listen on "
        "127.0.0.1, or pass --insecure if the network is trusted"
    )
    for flag, where, why in (
        ("--listen", settings.listen, "clients' pages"),
        ("--peer-listen", peer, "peers' pages and the peer API"),
    ):
        if where is None or is_loopback(where.host):
            continue
        if tls is None:
            raise ValueError(
                f"protected mode: {flag} {where} is reachable from other hosts without TLS, so "
                f"{why} would cross the network in clear text, to anyone: set --tls-cert, "
                f"--tls-key and --tls-ca {advice}"
            )
        if flag == "--listen" and not tokens:
            raise ValueError(
                f"protected mode: {flag} {where} is reachable from other hosts without --tokens, "
                "so any client that can reach it could read, overwrite and destroy every pool: "
                f"set --tokens {advice}"
            )
