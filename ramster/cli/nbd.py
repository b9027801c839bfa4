# `ramster nbd list`: the exports of a node's NBD port, as any NBD client would see them.
#
# It speaks NBD itself (ramster.nbd's ExportLister over a blocking socket: LIST, then INFO per
# export, then ABORT) rather than asking the node over gRPC, so what it prints is exactly what
# nbd-client, qemu or nbdinfo will be offered - and it works against any NBD server.  With
# --tls-ca it starts with STARTTLS, as a node with TLS demands, and checks the server's
# certificate against that CA (and shows --tls-cert to a node run with --tls-client-auth).
from __future__ import annotations

import argparse
import json
import socket
import ssl
import urllib.parse

from ramster.cli.errors import CliError
from ramster.cli.table import print_table
from ramster.cli.target import add_tls, hostport, seconds
from ramster.nbd import ExportInfo, ExportLister, NbdError, TransmissionFlag

NBD_PORT = 10809  # the IANA port of NBD
DEFAULT_NBD_TARGET = f"127.0.0.1:{NBD_PORT}"
FEATURES = {
    TransmissionFlag.SEND_TRIM: "trim",
    TransmissionFlag.SEND_WRITE_ZEROES: "zero",
    TransmissionFlag.SEND_FLUSH: "flush",
    TransmissionFlag.SEND_FUA: "fua",
    TransmissionFlag.CAN_MULTI_CONN: "multi-conn",
    TransmissionFlag.READ_ONLY: "read-only",
}


def client_tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS towards the server: its certificate checked against `ca`, ours shown if given."""
    if ca is None:
        if cert or key:
            raise CliError("--tls-cert and --tls-key need --tls-ca")
        return None
    if bool(cert) != bool(key):
        raise CliError("--tls-cert and --tls-key go together")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError too
        raise CliError(f"cannot use the TLS files: {exc}") from None
    return context


def nbd_target(text: str) -> str:
    """HOST:PORT, unix:PATH (a node's --nbd-listen unix:PATH), or an NBD URI as qemu and
    nbdinfo take it: nbd[s]://HOST[:PORT][/EXPORT] or nbd[s]+unix:///[EXPORT]?socket=PATH (the
    export is left out: every export is listed; TLS is --tls-ca's to ask for)."""
    if "://" in text:
        return _uri_target(text)
    if text.startswith("unix:"):
        if not text[5:]:
            raise argparse.ArgumentTypeError("expected unix:PATH, got 'unix:'")
        return text
    try:
        return hostport(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or unix:PATH, got {text!r}") from None


def _uri_target(text: str) -> str:
    """The HOST:PORT or unix:PATH an NBD URI names."""
    uri = urllib.parse.urlsplit(text)
    try:
        if uri.scheme in ("nbd", "nbds") and uri.hostname:
            host = f"[{uri.hostname}]" if ":" in uri.hostname else uri.hostname
            return f"{host}:{uri.port or NBD_PORT}"
        if uri.scheme in ("nbd+unix", "nbds+unix"):
            (path,) = urllib.parse.parse_qs(uri.query)["socket"]
            return f"unix:{path}"
    except (ValueError, KeyError):  # a port out of range or not a number, no or two sockets
        pass
    raise argparse.ArgumentTypeError(
        f"expected HOST:PORT, unix:PATH, nbd://HOST[:PORT] or nbd+unix:///?socket=PATH, got "
        f"{text!r}"
    )


def connect(target: str, timeout: float) -> tuple[socket.socket, str | None]:
    """A stream socket connected to HOST:PORT or unix:PATH, and the host (None: a Unix
    socket)."""
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target[5:])
        except OSError:
            sock.close()
            raise
        return sock, None
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    return socket.create_connection((host, int(port)), timeout=timeout), host


def list_exports(
    target: str, timeout: float, tls: ssl.SSLContext | None = None
) -> list[ExportInfo]:
    """The exports an NBD server at HOST:PORT or unix:PATH offers (asked over TLS with `tls`:
    on a Unix socket the server's certificate is checked against the CA but not against a host
    name, as there is none)."""
    lister = ExportLister(tls=tls is not None)
    try:
        sock, host = connect(target, timeout)
        try:
            while not lister.done:
                lister.receive_data(sock.recv(65536))
                if lister.upgrade:
                    assert tls is not None
                    tls.check_hostname = host is not None  # a Unix socket names no host
                    sock = tls.wrap_socket(sock, server_hostname=host)
                    lister.tls_started()
                out = lister.data_to_send()
                if out:  # nothing after ABORT's reply: the server may have closed (a Unix
                    sock.sendall(out)  # socket's peer then fails even an empty send)
        finally:
            sock.close()
    except (OSError, NbdError) as exc:
        raise CliError(f"{target}: {exc}") from None
    return lister.exports


def human(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(len(units) - 1, (size.bit_length() - 1) // 10) if size else 0
    return f"{size / 1024**power:.1f} {units[power]}" if power else f"{size} B"


def _list(args: argparse.Namespace) -> int:
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    exports = list_exports(args.target, args.timeout, tls)
    if args.json:
        print(json.dumps([vars(e) for e in exports], indent=2))
        return 0
    if not exports:
        print("no exports")
        return 0
    rows = [
        [
            e.name,
            e.size,
            human(e.size),
            "/".join(str(b) for b in e.block_sizes),
            ",".join(name for flag, name in FEATURES.items() if e.flags & flag),
            ",".join(e.contexts) or "-",
            e.error or e.description,
        ]
        for e in exports
    ]
    header = ["export", "bytes", "size", "block min/pref/max", "features", "contexts", "note"]
    print_table(header, rows)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nbd = commands.add_parser("nbd", help="a node's NBD (block device) exports")
    actions = nbd.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "list",
        help="list the exports of an NBD port",
        description="Connect to an NBD port (a node's --nbd-listen, or any NBD server), list "
        "its exports with their sizes, block sizes, features and metadata contexts "
        "(base:allocation: the server can map which blocks hold data), and disconnect.  With "
        "--tls-ca, over TLS (STARTTLS), as a node run with --tls-* requires.",
    )
    p.add_argument(
        "--target",
        type=nbd_target,
        default=DEFAULT_NBD_TARGET,
        metavar="ADDRESS",
        help=f"the NBD address: HOST:PORT, unix:PATH, or an NBD URI (nbd://HOST[:PORT], "
        f"nbd+unix:///?socket=PATH) (default {DEFAULT_NBD_TARGET})",
    )
    p.add_argument("--timeout", type=seconds, default=10.0, metavar="S", help="socket timeout")
    add_tls(p)
    p.add_argument("--json", action="store_true", help="print the exports as JSON")
    p.set_defaults(func=_list)
