# The node's transport security: its TLS material, the credentials of its two gRPC listeners,
# and protected mode.
#
# --tls-cert/--tls-key/--tls-ca go together (all or none).  The certificate must be a node
# certificate naming this node id (ramster/certs.py: a spiffe://ramster/node/<id> URI SAN),
# checked at start, since peers would refuse it on every call otherwise.  With TLS the client
# listener serves TLS (client certificates required only with --tls-client-auth) and the peer
# listener always requires a client certificate signed by the CA; what the certificate names
# is then checked per call by node/peering.py's PeerAuthInterceptor.  The files are read once
# at start: rotating certificates means restarting the node (one at a time, as for upgrades).
#
# Protected mode, as Redis 7: a listener on an address other hosts can reach (anything but
# 127.0.0.0/8, ::1 and "localhost") is refused at start unless it is protected, or --insecure
# says the operator knows.  The client port is protected by TLS *and* tokens (--tokens: without
# them anyone who can reach it could read and write every pool); the peer port by TLS, which
# there always means mTLS with the cluster's node certificates; NBD has no TLS, so a reachable
# NBD port always needs --insecure.  Loopback needs nothing, so a bare node and `ramster demo`
# stay zero-configuration.
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc

from node.settings import HostPort, Settings
from ramster.certs import NODE, member_of_pem


@dataclass(frozen=True)
class NodeTls:
    cert: bytes
    key: bytes
    ca: bytes
    client_auth: bool

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=require_client_cert,
        )

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
    if nbd is not None and not is_loopback(nbd.host):
        raise ValueError(
            f"protected mode: --nbd-listen {nbd}: NBD has no TLS, so it is served on loopback "
            "addresses only (127.0.0.1, ::1) unless --insecure; block devices would cross the "
            "network in clear text (reach it through an SSH tunnel instead)"
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
