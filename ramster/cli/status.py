# `ramster stats` (a node's counters as a table, then its pools) and `ramster health` (the
# standard gRPC health check: one line, exit 0 when SERVING and 1 otherwise, unreachable
# included, which is what a Docker or Kubernetes probe wants).
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ramster.cli.table import print_table
from ramster.cli.target import add_target, connect, tls_of, token_of
from ramster.client import Client, RamsterError


def _stats(args: argparse.Namespace) -> int:
    with connect(args) as client:
        s = client.stats()
    rows: list[Sequence[object]] = [
        ["node", s.node_id],
        ["version", s.version],
        ["pool limit bytes", f"{s.pool_limit_bytes:,}"],
        ["pool size bytes", f"{s.pool_size_bytes:,}"],
        ["stored pages", f"{s.stored_pages:,}"],
        ["pages in frames", f"{s.zpages:,}"],
        ["written back pages", f"{s.written_back_pages:,}"],
        ["pages per frame", f"{s.pages_per_frame:.3f}"],
        ["puts", f"{s.puts:,}"],
        *[[f"  {reason}", f"{n:,}"] for reason, n in sorted(s.put_outcomes.items())],
        ["duplicate puts", f"{s.duplicate_puts:,}"],
        ["gets", f"{s.gets:,}"],
        ["  hits", f"{s.hits:,}"],
        ["  misses", f"{s.misses:,}"],
        ["  corrupt", f"{s.corrupt:,}"],
        ["  unavailable", f"{s.unavailable:,}"],
        ["flushes", f"{s.flushes:,}"],
        ["compacted frames", f"{s.compacted_frames:,}"],
    ]
    print_table(["stat", "value"], rows)
    if s.pools:
        print()
        kinds = {1: "persistent", 2: "ephemeral"}
        print_table(
            ["pool", "kind", "allocator", "pages"],
            [[p.pool, kinds.get(p.kind, "persistent"), p.allocator, p.pages] for p in s.pools],
        )
    return 0


def _health(args: argparse.Namespace) -> int:
    try:
        with Client(
            args.target, timeout=args.timeout, token=token_of(args), **tls_of(args)
        ) as client:
            status = client.health(args.service)
    except RamsterError as exc:
        print(f"UNREACHABLE {args.target}: {exc}")
        return 1
    print(status if status == "SERVING" else f"{status} {args.target}")
    return 0 if status == "SERVING" else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "stats",
        help="a node's counters and pools, as a table",
        description="Print a node's pool size and limit, page counts, put outcomes, get "
        "results and pools.",
    )
    add_target(p)
    p.set_defaults(func=_stats)

    p = commands.add_parser(
        "health",
        help="check a node with the standard gRPC health service (exit 0 when serving)",
        description="Ask a node's grpc.health.v1 service for its status and print it on one "
        "line.  Exit status 0 when SERVING, 1 otherwise (NOT_SERVING while shutting down, "
        "unreachable, deadline exceeded).",
    )
    add_target(p, timeout=5.0)
    p.add_argument("--service", default="", help="service to check (default: the whole node)")
    p.set_defaults(func=_health)
