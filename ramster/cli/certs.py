# `ramster certs`: the certificates of a cluster (ramster/certs.py), so compose, Kubernetes and
# tests turn TLS on without openssl recipes.  It prints what it wrote and the node flags to use.
from __future__ import annotations

import argparse
from pathlib import Path

from ramster.certs import CertError, make_bundle
from ramster.cli.errors import CliError
from ramster.cli.target import positive


def names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _certs(args: argparse.Namespace) -> int:
    if not args.nodes:
        raise CliError("--nodes names no node")
    try:
        bundle = make_bundle(args.out, args.nodes, args.clients, args.hosts, args.days, args.ca_dir)
    except (CertError, OSError) as exc:
        raise CliError(str(exc)) from None
    ca_key = (args.ca_dir or args.out) / "ca.key"
    print(f"CA          {bundle.ca} (key {ca_key}: keep it away from nodes)")
    for role, issued in (("node", bundle.nodes), ("client", bundle.clients)):
        for name, (cert, key) in issued.items():
            print(f"{role:<6} {name:<12} {cert}  {key}")
    first = next(iter(bundle.nodes))
    cert, key = bundle.nodes[first]
    flags = f"--tls-cert {cert} --tls-key {key} --tls-ca {bundle.ca}"
    print(f"\nramster-node --node-id {first} {flags}")
    print(f"ramster health --target 127.0.0.1:7070 --tls-ca {bundle.ca}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "certs",
        help="make a cluster CA and node/client certificates for TLS and peer mTLS",
        description="Write a CA (ca.crt, ca.key; reused when DIR has one already), a certificate "
        "and key per node (nodes/NAME.crt, .key) and per client (clients/NAME.crt, .key), keys "
        "with mode 0600.  A node's certificate names it (URI SAN spiffe://ramster/node/NAME), "
        "which is what its peers check, and covers NAME, localhost, 127.0.0.1, ::1 and --hosts "
        "as server names; a client certificate cannot call the peer API.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    p.add_argument(
        "--nodes", type=names, required=True, metavar="N1,N2,...", help="node ids (--node-id)"
    )
    p.add_argument(
        "--clients", type=names, default=[], metavar="NAME,...", help="client certificates"
    )
    p.add_argument(
        "--hosts",
        type=names,
        default=[],
        metavar="HOST,...",
        help="more names or IPs that clients and peers dial, on every node certificate; "
        "{node} stands for the node id (e.g. {node}.ramster-peers)",
    )
    p.add_argument("--days", type=positive, default=365, help="validity of leaf certificates")
    p.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help="keep the CA (ca.crt, ca.key) here instead of --out, where nodes cannot read its "
        "key; ca.crt is copied to --out",
    )
    p.set_defaults(func=_certs)
