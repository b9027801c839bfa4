# `ramster bench ...`: the benchmark commands.  Each prints a table, or one JSON object (--json).
from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from ramster.bench import cluster as bench_cluster
from ramster.bench import engine, fragmentation, latency, nbd, node, reaper, soak, tls
from ramster.bench.corpus import CorpusError, load_corpus
from ramster.bench.report import emit
from ramster.cli.errors import CliError
from ramster.cli.target import (
    add_tls,
    add_token,
    niceness,
    nonnegative,
    positive,
    tls_of,
    token_of,
)
from ramster.client import RamsterError
from ramster.client.cluster import LocalCluster
from ramster.client.local import LocalNode
from ramster.zcache import ALLOCATORS


def corpus_pages(path: str) -> list[bytes]:
    try:
        return load_corpus(path)
    except CorpusError as exc:
        raise CliError(str(exc)) from None


def start_cluster(nodes: int, pool_limit: str, secured: bool = False) -> LocalCluster:
    try:
        return bench_cluster.start_cluster(nodes, pool_limit, tls=secured)
    except RamsterError as exc:
        raise CliError(f"the cluster did not start: {exc}") from None


def _engine(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    result = engine.run(pages, args.allocator, args.pages or len(pages), args.store_raw)
    emit(result, args.json)
    return 0 if result["verified"] else 1


def _fragmentation(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    result = fragmentation.run(pages, args.allocator, args.pages or len(pages), args.seed)
    emit(result, args.json)
    return 0


def _reaper(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    keys = args.keys or args.pool_limit_frames * 12
    result = reaper.run(
        pages,
        args.allocator,
        args.pool_limit_frames,
        keys,
        args.ops or keys * 5,
        args.skew,
        seed=args.seed,
    )
    if args.empty_pools:
        result |= reaper.empty_pools_report(
            pages, args.allocator, args.pool_limit_frames, args.empty_pools
        )
    emit(result, args.json)
    return 0 if result["verified"] else 1


def _node(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    if args.tls and args.target:
        raise CliError("--tls compares local nodes; against --target give --tls-ca instead")
    count, batch, window = args.pages or len(pages), args.batch, args.window
    run = partial(node.run, pages, count=count, batch=batch, window=window, singles=args.singles)
    try:
        if args.tls:
            result = tls.compare(partial(tls.node_run, run), tls.NODE_RATES, args.repeat)
        else:
            result = run(target=args.target, tls=tls_of(args), token=token_of(args))
    except RamsterError as exc:
        where = args.target or "the local node"
        raise CliError(f"{where}: {exc}") from None
    emit(result, args.json)
    return 0 if result["verified"] else 1


def _latency(args: argparse.Namespace) -> int:
    corpus_pages(args.corpus)  # a bad corpus is refused here, before any process starts
    try:
        result = latency.run(
            args.corpus,
            args.target,
            args.metrics,
            singles=args.singles,
            batch=args.batch,
            window=args.window,
            pages=args.pages,
            clients=args.clients,
            cluster=args.cluster,
            pool_limit=args.pool_limit,
            bulk_nice=args.bulk_nice,
        )
    except RamsterError as exc:
        raise CliError(f"{args.target or 'the local node'}: {exc}") from None
    emit(result, args.json)
    return 0 if result["verified"] and not result.get("peer_polls_seeing_a_node_down") else 1


def _cluster_run(args: argparse.Namespace, pages: list[bytes], secured: bool) -> dict[str, Any]:
    count = args.pages or len(pages) * 3
    cluster = start_cluster(args.nodes, args.pool_limit, secured)
    try:
        if secured or args.tls:  # the TLS comparison times the cluster alone
            return bench_cluster.run(cluster, pages, count)
        with LocalNode("--pool-limit", args.pool_limit) as baseline:
            return bench_cluster.run(cluster, pages, count, baseline=baseline, repair=True)
    except RamsterError as exc:
        raise CliError(f"the local cluster: {exc}") from None
    finally:
        cluster.__exit__()


def _cluster(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    if args.tls:
        result = tls.compare(partial(_cluster_run, args, pages), tls.CLUSTER_RATES)
        emit(result, args.json)
        lost = result["plaintext"]["lost"] + result["tls"]["lost"]
        return 0 if result["verified"] and not lost else 1
    result = _cluster_run(args, pages, False)
    nodes = result.pop("nodes")
    if not args.json:
        result["nodes"] = {
            row["node"]: f"ram={row['pages_in_ram']} peers={row['pages_remote']} "
            f"disk={row['pages_on_disk']} held={row['held_for_peers']}"
            for row in nodes
        }
    else:
        result["nodes"] = nodes
    emit(result, args.json)
    return 0 if result["verified"] and not result["lost"] else 1


def _nbd(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    try:
        result = nbd.run(
            pages,
            args.mib * 2**20,
            args.ops,
            args.repeat,
            args.tls,
            args.worker_threads,
            unix=args.unix,
        )
    except nbd.BenchError as exc:
        raise CliError(str(exc)) from None
    emit(result, args.json)
    return 0 if result["verified"] else 1


def _soak(args: argparse.Namespace) -> int:
    pages = corpus_pages(args.corpus)
    cluster = None if args.target else start_cluster(3, args.pool_limit)
    try:
        result = soak.run(
            pages, args.seconds, args.keys, args.batch, args.seed, args.target, cluster
        )
    except (RamsterError, ValueError) as exc:
        raise CliError(f"{args.target or 'the local cluster'}: {exc}") from None
    finally:
        if cluster is not None:
            cluster.__exit__()
    emit(result, args.json)
    return 0 if not (result["wrong"] or result["lost"] or result["transient"]) else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="run a benchmark and print its numbers")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = kinds.add_parser(
        "engine",
        help="density and speed of one zcache pool on a page corpus",
        description="Put every page of a corpus into one persistent pool (cycling the corpus "
        "when --pages is larger), read every page back and compare, and print density, "
        "speed (against plain LZ4 on the same pages in the same run) and metadata overhead.",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--allocator", choices=ALLOCATORS, default="zsmalloc")
    p.add_argument("--pages", type=positive, help="pages to put (default: the corpus size)")
    p.add_argument(
        "--store-raw",
        action="store_true",
        help="store incompressible pages raw instead of refusing them",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_engine)

    p = kinds.add_parser(
        "fragmentation",
        help="flush and overwrite churn in one pool: compaction against perfect packing, and "
        "pages evicted with compaction on and off",
        description="Fill a pool, flush a random half and overwrite a quarter with pages of "
        "other size classes; print frames before and after compaction against the frames "
        "perfect packing needs for what is left, and the pages the reaper evicts over rounds "
        "of such churn under a limit the live data fits in, with compaction on and off.",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--allocator", choices=ALLOCATORS, default="zsmalloc")
    p.add_argument("--pages", type=positive, help="pages in the pool (default: the corpus size)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_fragmentation)

    p = kinds.add_parser(
        "reaper",
        help="LRU reclaim and write-back under a workload larger than the pool limit",
        description="Run a seeded Zipf workload (puts, overwrites, verified gets) over more keys "
        "than fit under --pool-limit-frames, with a backing file behind the pool, and compare the "
        "in-memory hit ratio with an exact LRU cache of the same capacity in pages.",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--allocator", choices=ALLOCATORS, default="zsmalloc")
    p.add_argument("--pool-limit-frames", type=positive, required=True, help="pool limit in frames")
    p.add_argument(
        "--keys", type=positive, help="distinct keys (default: 12 x the pool limit in frames)"
    )
    p.add_argument("--ops", type=positive, help="operations (default: 5 x keys)")
    p.add_argument("--skew", type=float, default=0.9, help="Zipf exponent (default 0.9)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--empty-pools",
        type=positive,
        help="also time reclaim-bound puts alone and beside this many empty pools",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_reaper)

    p = kinds.add_parser(
        "cluster",
        help="puts and gets through a node whose pool is full, so pages go to peers",
        description="Start a local cluster (real node processes on 127.0.0.1) with a small pool "
        "on node 1, put --pages pages of a corpus through it, then time gets of pages still in "
        "its RAM (local hits) and of pages parked on peers (remote hits), as batches and as "
        "single-page gets, and verify every page.  In the same run a node without peers (same "
        "limit) takes the same puts (spill_put_vs_baseline), and at the end the last node is "
        "SIGKILLed and node 1's re-replication of what it held is timed (repair_pages_per_s).",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--pages", type=positive, help="pages to put (default: 3 x the corpus)")
    p.add_argument("--nodes", type=int, default=3, choices=range(2, 10), metavar="N")
    p.add_argument("--pool-limit", default="16Mi", help="node 1's pool limit (default 16Mi)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="run twice, plaintext then TLS to clients and mTLS between nodes, and print "
        "TLS/plaintext of each rate",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cluster)
    p = kinds.add_parser(
        "node",
        help="put/get speed and latency of a node over gRPC, every page verified",
        description="Put every page of a corpus into a new pool of a node through the pipelined "
        "stream API (cycling the corpus when --pages is larger), get every page back and compare, "
        "then time single-page gets; print pages/s, MB/s and p50/p99 latency per RPC.  Without "
        "--target a node is started as a subprocess for the run.  Run the client on a different "
        "process than the node, as here, for meaningful numbers.",
    )
    p.add_argument("--target", metavar="HOST:PORT", help="the node (default: start a local one)")
    add_tls(p)
    add_token(p)
    p.add_argument(
        "--tls",
        action="store_true",
        help="no --target: run twice on fresh local nodes, plaintext then TLS, and print "
        "TLS/plaintext of each rate",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--pages", type=positive, help="pages to put (default: the corpus size)")
    p.add_argument("--batch", type=positive, default=1024, help="pages per batch (max 4096)")
    p.add_argument("--window", type=positive, default=4, help="batches in flight")
    p.add_argument("--singles", type=positive, default=2000, help="single-page gets to time")
    p.add_argument(
        "--repeat",
        type=positive,
        default=1,
        help="with --tls: plaintext/TLS pairs to run; each ratio is the pairs' median",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_node)
    p = kinds.add_parser(
        "latency",
        help="single-get latency on an idle node and under bulk load; throughput vs clients",
        description="On one node (started for the run unless --target is given): time "
        "single-page gets alone, then while another process streams put and get batches, and "
        "print p50/p99/max of both and their ratio; then put and get --pages pages with 1, 2 "
        "and 4 client processes and print the aggregate pages/s.  With the node's metrics "
        "(always for a node started here) the node's own event-loop lag and the cores its "
        "threads used (event loop, codec workers, gRPC's threads) are printed too.  "
        "--cluster runs the node as node 1 of a local 3-node cluster with fast heartbeats and "
        "checks its peers never see it down while it is loaded.  Every page read is verified.",
    )
    p.add_argument("--target", metavar="HOST:PORT", help="the node (default: start a local one)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="the --target node's metrics address")
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--singles", type=positive, default=2000, help="single-page gets per phase")
    p.add_argument("--pages", type=positive, default=65536, help="pages per bulk round")
    p.add_argument("--batch", type=positive, default=1024, help="pages per bulk batch (max 4096)")
    p.add_argument("--window", type=positive, default=4, help="bulk batches in flight")
    p.add_argument(
        "--clients",
        type=lambda text: [positive(n) for n in text.split(",")],
        default=[1, 2, 4],
        help="client process counts for the throughput phase (default 1,2,4)",
    )
    p.add_argument("--cluster", action="store_true", help="measure node 1 of a local cluster")
    p.add_argument("--pool-limit", default="2Gi", help="pool limit of a node started here")
    p.add_argument(
        "--bulk-nice",
        type=niceness,
        default=10,
        metavar="N",
        help="run the bulk client N steps below normal CPU priority, 0-19 (default 10): its "
        "load belongs on other hosts, and on a small machine the scheduler would otherwise "
        "preempt the node for it; 0 measures that contention too",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_latency)
    p = kinds.add_parser(
        "nbd",
        help="a node's NBD export against nbdkit memory: throughput and data per GiB of RSS",
        description="Start a local node with one NBD export and `nbdkit memory` of the same "
        "size; on each, write --mib MiB of a corpus sequentially with nbdcopy, read it back, "
        "then do --ops random 4 KiB writes and reads with libnbd, each step alternating between "
        "the servers --repeat times (best time kept); print MiB/s, the server's RSS and data "
        "held per GiB of RSS side by side, and verify every byte.  Needs nbdkit, libnbd-bin and "
        "python3-libnbd.",
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument(
        "--mib",
        type=positive,
        default=1024,
        help="MiB written sequentially (default 1024: the node's fixed ~48 MiB weighs less in "
        "its data per GiB of RSS the more it holds)",
    )
    p.add_argument(
        "--ops", type=positive, default=20000, help="random 4 KiB writes and reads (default 20000)"
    )
    p.add_argument(
        "--repeat",
        type=positive,
        default=3,
        help="runs of each step per server, best kept (default 3)",
    )
    p.add_argument("--tls", action="store_true", help="both servers require TLS (nbds://)")
    p.add_argument(
        "--unix",
        action="store_true",
        help="both servers on Unix sockets (nbd+unix://) instead of loopback TCP ports",
    )
    p.add_argument(
        "--worker-threads",
        type=nonnegative,
        help="the node's codec worker threads (its --worker-threads; default: the node's, "
        "2 on 2 cores or more)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_nbd)
    p = kinds.add_parser(
        "soak",
        help="a long mixed workload judged against a model: wrong, lost and transient answers",
        description="Overwrite, read and flush a fixed set of keys of one persistent pool at "
        "random, in batches, for --seconds, with a model of what every key holds; report "
        "operations, wrong answers, lost pages, transient misses (a page that exists not served "
        "until a retry), batch latency and the RSS of every node over time.  Without --target, a "
        "local 3-node cluster is started whose node 1 has a small --pool-limit, so pages keep "
        "moving to peers and back.  Exit status 1 if anything was wrong, lost or transient.",
    )
    p.add_argument(
        "--target", metavar="HOST:PORT", help="a running node (default: a local cluster)"
    )
    p.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    p.add_argument("--seconds", type=positive, default=60, help="how long (default 60)")
    p.add_argument("--keys", type=positive, default=30_000, help="distinct keys (default 30000)")
    p.add_argument("--batch", type=positive, default=64, help="keys per batch (default 64)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pool-limit", default="8Mi", help="node 1's pool limit (default 8Mi)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_soak)
