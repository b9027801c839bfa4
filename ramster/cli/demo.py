# `ramster demo`: the main job.  A local cluster on loopback, a workload that overflows node 1,
# a summary of where the pages went, every page read back and checked; then the cluster stays up
# (its addresses printed) until Ctrl-C, or stops at once with --once.
#
# With no --corpus the pages are this process's own resident memory (real heap pages, found on
# any Linux machine), so the demo needs no file and no configuration.
from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from ramster.bench import cluster as bench_cluster
from ramster.bench.procpages import own_memory_pages
from ramster.cli.bench import corpus_pages, start_cluster
from ramster.cli.errors import CliError

COLUMNS = (
    ("node", "node"),
    ("pages_in_ram", "in RAM"),
    ("pages_remote", "on peers"),
    ("pages_on_disk", "on disk"),
    ("held_for_peers", "held for peers"),
    ("pages_per_frame", "pages/frame"),
    ("pool_mib", "pool MiB"),
    ("peers_up", "peers up"),
)


def _pages(args: argparse.Namespace) -> tuple[list[bytes], str]:
    if args.corpus:
        return corpus_pages(args.corpus), args.corpus
    pages = own_memory_pages(args.pages)
    if not pages:
        raise CliError("no resident memory pages could be read from /proc/self; use --corpus")
    return pages, "this process's own memory"


def _table(rows: list[dict[str, object]]) -> str:
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in COLUMNS]
    lines = ["  ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths, strict=True))]
    for row in rows:
        lines.append(
            "  ".join(str(row[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True))
        )
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    pages, source = _pages(args)
    print(f"starting {args.nodes} nodes on 127.0.0.1 (node1 pool limit {args.pool_limit}) ...")
    cluster = start_cluster(args.nodes, args.pool_limit)
    try:
        print(f"putting {args.pages:,} pages ({source}) through {cluster.targets[0]} ...")
        result = bench_cluster.run(cluster, pages, args.pages)
        if args.json:
            print(json.dumps(result))
        else:
            print()
            print(_table(result["nodes"]))
            print()
            print(
                f"put  {result['put_pages_per_s']:>8,} pages/s   "
                f"(p50 {result['put_p50_ms']} ms, p99 {result['put_p99_ms']} ms per "
                f"{result['batch_pages']}-page batch)"
            )
            print(
                f"get  {result['local_get_pages_per_s']:>8,} pages/s from RAM, "
                f"{result['remote_get_pages_per_s']:,} pages/s from peers "
                f"(single get p50 {result['local_single_get_p50_ms']} ms local, "
                f"{result['remote_single_get_p50_ms']} ms remote)"
            )
            verdict = "every page read back equal" if result["verified"] else "MISMATCH"
            print(f"verified: {verdict}; pages lost: {result['lost']}")
        if not args.once:
            print("\ncluster running: " + ", ".join(cluster.targets))
            print("try: ramster stats --target " + cluster.targets[1] + "   (Ctrl-C to stop)")
            sys.stdout.flush()
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while all(n.running for n in cluster.nodes):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                print("\nstopping ...")
        return 0 if result["verified"] and not result["lost"] else 1
    finally:
        for node in cluster.nodes:
            node.send_signal(signal.SIGTERM)
        for node in cluster.nodes:
            try:
                node.wait(timeout=30)
            except Exception:
                node.kill()
        cluster.__exit__()


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "demo",
        help="run a local 3-node cluster, overflow node 1 into its peers, verify every page",
        description="Start a RAMster cluster on 127.0.0.1 (no configuration needed), put pages "
        "through node 1 past its small pool limit so they spill to the peers, print where the "
        "pages went and the throughput, read every page back and compare, then keep the "
        "cluster running until Ctrl-C (or stop at once with --once).",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=3,
        choices=range(2, 10),
        metavar="N",
        help="nodes in the cluster (2-9, default 3)",
    )
    p.add_argument("--pages", type=int, default=20_000, help="pages to put (default 20,000)")
    p.add_argument("--pool-limit", default="16Mi", help="node 1's pool limit (default 16Mi)")
    p.add_argument("--corpus", help="file of raw 4096-byte pages (default: own memory)")
    p.add_argument("--once", action="store_true", help="stop the cluster when done")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_demo)
