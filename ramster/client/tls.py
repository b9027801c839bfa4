# The client's channel: plaintext, or TLS when a CA (or a client certificate) is given.
#
# The CA is the cluster's (`ramster certs` makes it, ca.crt): the node's certificate must be
# signed by it and name the address dialled (127.0.0.1, localhost, the node id, --hosts), so a
# node behind a foreign CA, or a plaintext one, fails the handshake.  A client certificate and
# key go together; a node asks for one only with --tls-client-auth.  Files are read when the
# client is made, so a missing file is an error at once, not at the first call.
from __future__ import annotations

from pathlib import Path

import grpc

from ramster.client.errors import InvalidArgument
from ramster.wire import CHANNEL_OPTIONS

PathLike = str | Path


def _read(what: str, path: PathLike | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def open_channel(
    target: str,
    tls_ca: PathLike | None = None,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> grpc.aio.Channel:
    """A channel to `target`; TLS if any of the TLS files is given."""
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("a client certificate needs its key, and a key its certificate")
    if tls_ca is None and tls_cert is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        _read("CA certificate", tls_ca),
        _read("client key", tls_key),
        _read("client certificate", tls_cert),
    )
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
