# TLS on the NBD port: with --tls-* the port is in the protocol's FORCEDTLS mode (the machine,
# ramster.nbd, answers every option before STARTTLS with NBD_REP_ERR_TLS_REQD), and the
# connection upgrades in place (node/nbd/connection.py) with the context made here: the node's
# certificate and key; client certificates checked against --tls-ca, and required with
# --tls-client-auth.  Certificates rotate as the gRPC listeners' do: NbdTls checks the files
# before each handshake.  Without TLS, protected mode (node/tls.py) keeps the port on loopback
# unless --insecure.  client_name() reads who connected from the certificate the handshake
# checked, for --nbd-allow.
from __future__ import annotations

import asyncio
import logging
import ssl

from node.logs import log_event
from node.settings import Settings
from node.tls import NodeTls, Rotation


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """The NBD port's TLS: the node's certificate and key, clients checked against the CA (and
    required to show a certificate with --tls-client-auth).  node/tls.py checks the files."""
    assert settings.tls_cert and settings.tls_key and settings.tls_ca
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.load_verify_locations(settings.tls_ca)
    context.verify_mode = ssl.CERT_REQUIRED if settings.tls_client_auth else ssl.CERT_OPTIONAL
    return context


class NbdTls:
    """The NBD port's SSL context, made anew when the node's TLS files rotate: before each
    handshake the rotation checks the files (a stat of three, as gRPC's listeners do), and a
    change it accepts rebuilds the context; connections already open keep their session."""

    def __init__(self, settings: Settings, rotation: Rotation | None = None) -> None:
        self.settings = settings
        self.rotation = rotation
        self.context = server_tls_context(settings)
        if rotation is not None:
            rotation.on_change.append(self._reload)

    def for_handshake(self) -> ssl.SSLContext:
        if self.rotation is not None:
            self.rotation.check()
        return self.context

    def _reload(self, _: NodeTls) -> None:
        try:
            self.context = server_tls_context(self.settings)
        except OSError as exc:  # ssl.SSLError too: the files changed again under us
            log_event("nbd_tls_reload_failed", logging.WARNING, error=str(exc))


def client_name(transport: asyncio.BaseTransport) -> str | None:
    """The name of the client certificate a TLS transport's peer showed (its one
    spiffe://ramster/client/NAME), None if it showed none, or not a client's."""
    from ramster.certs import CLIENT, member_of_pem  # cryptography: only a node with TLS loads it

    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    member = member_of_pem(ssl.DER_cert_to_PEM_cert(der).encode())
    return member.name if member is not None and member.role == CLIENT else None
