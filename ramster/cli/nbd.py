# `ramster nbd list`: the exports of a node's NBD port, as any NBD client would see them.
#
# It speaks NBD itself (ramster.nbd's ExportLister over a blocking socket: LIST, then INFO per
# export, then ABORT) rather than asking the node over gRPC, so what it prints is exactly what
# nbd-client, qemu or nbdinfo will be offered - and it works against any NBD server.
from __future__ import annotations

import argparse
import json
import socket

from ramster.cli.errors import CliError
from ramster.cli.table import print_table
from ramster.cli.target import hostport, seconds
from ramster.nbd import ExportInfo, ExportLister, NbdError, TransmissionFlag

DEFAULT_NBD_TARGET = "127.0.0.1:10809"  # the IANA port of NBD
FEATURES = {
    TransmissionFlag.SEND_TRIM: "trim",
    TransmissionFlag.SEND_WRITE_ZEROES: "zero",
    TransmissionFlag.SEND_FLUSH: "flush",
    TransmissionFlag.SEND_FUA: "fua",
    TransmissionFlag.CAN_MULTI_CONN: "multi-conn",
    TransmissionFlag.READ_ONLY: "read-only",
}


def list_exports(target: str, timeout: float) -> list[ExportInfo]:
    """The exports an NBD server at HOST:PORT offers."""
    host, _, port = target.rpartition(":")
    lister = ExportLister()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            while not lister.done:
                lister.receive_data(sock.recv(65536))
                sock.sendall(lister.data_to_send())
    except (OSError, NbdError) as exc:
        raise CliError(f"{target}: {exc}") from None
    return lister.exports


def human(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(len(units) - 1, (size.bit_length() - 1) // 10) if size else 0
    return f"{size / 1024**power:.1f} {units[power]}" if power else f"{size} B"


def _list(args: argparse.Namespace) -> int:
    exports = list_exports(args.target, args.timeout)
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
            e.error or e.description,
        ]
        for e in exports
    ]
    print_table(["export", "bytes", "size", "block min/pref/max", "features", "note"], rows)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nbd = commands.add_parser("nbd", help="a node's NBD (block device) exports")
    actions = nbd.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "list",
        help="list the exports of an NBD port",
        description="Connect to an NBD port (a node's --nbd-listen, or any NBD server), list "
        "its exports with their sizes, block sizes and features, and disconnect.",
    )
    p.add_argument(
        "--target",
        type=hostport,
        default=DEFAULT_NBD_TARGET,
        metavar="HOST:PORT",
        help=f"the NBD address (default {DEFAULT_NBD_TARGET})",
    )
    p.add_argument("--timeout", type=seconds, default=10.0, metavar="S", help="socket timeout")
    p.add_argument("--json", action="store_true", help="print the exports as JSON")
    p.set_defaults(func=_list)
