# `ramster bench cluster` and `ramster demo`: a local cluster on loopback whose first node's pool
# is far smaller than the data put through it, so most pages go to the peers.
#
# run() starts the cluster (LocalCluster: real node processes), puts the pages through node 1 in
# batches (per-RPC latency recorded), waits until every evicted page is placed, reads the node
# table, then times gets of pages still in node 1's RAM (the newest, "local hits") and of pages
# parked on peers (the oldest, "remote hits"), as batches and as single-page gets, and finally
# reads every page back and compares (clients speak TLS when the cluster does).  Local gets come
# first: a remote hit brings its page home and pushes others out, which is the system working,
# not noise.
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ramster.bench.node import percentile_ms
from ramster.bench.report import Progress
from ramster.client import Client, PageStatus
from ramster.client.cluster import LocalCluster

OID = 1
BATCH = 256
FAST_PEERS = ["--heartbeat-interval", "0.25", "--down-after", "3"]


def _timed(calls: Sequence[Callable[[], Any]]) -> tuple[float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - started, latencies


def node_table(cluster: LocalCluster) -> list[dict[str, Any]]:
    rows = []
    for node in cluster.nodes:
        with node.client(timeout=30) as client:
            s = client.stats()
        rows.append(
            {
                "node": s.node_id,
                "target": node.target,
                "pages_in_ram": s.stored_pages - s.written_back_pages,
                "pages_remote": s.remote_pages,
                "pages_on_disk": s.written_back_pages - s.remote_pages,
                "held_for_peers": s.foreign_pages,
                "pages_per_frame": round(s.pages_per_frame, 3),
                "pool_mib": round(s.pool_size_bytes / 2**20, 1),
                "peers_up": s.peers_up,
            }
        )
    return rows


def wait_placed(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.stats().remote_outbox and time.monotonic() < deadline:
        time.sleep(0.1)


def run(
    cluster: LocalCluster, pages: list[bytes], count: int, singles: int = 200
) -> dict[str, Any]:
    """Drive a started cluster through its first node; the measurements and node table."""
    data = [pages[i % len(pages)] for i in range(count)]
    with cluster.nodes[0].client(timeout=120) as client:
        pool = client.create_pool()
        progress = Progress("put", count)
        refused = 0

        def put(start: int) -> Callable[[], None]:
            def call() -> None:
                nonlocal refused
                chunk = data[start : start + BATCH]
                outcomes = client.put_many(pool, OID, start, chunk)
                refused += sum(1 for o in outcomes if o.refused)
                progress.update(start + len(chunk))

            return call

        put_s, put_lat = _timed([put(s) for s in range(0, count, BATCH)])
        wait_placed(client)
        table = node_table(cluster)
        local_n = min(count // 10, 2048)
        newest = list(range(count - local_n, count))
        oldest = list(range(0, local_n))

        def get_batch(indexes: list[int]) -> list[Callable[[], Any]]:
            return [
                partial(client.get_many, pool, OID, indexes[s], min(BATCH, len(indexes) - s))
                for s in range(0, len(indexes), BATCH)
            ]

        def singles_of(indexes: list[int]) -> list[Callable[[], Any]]:
            step = max(1, len(indexes) // singles)
            return [partial(client.get, pool, OID, i) for i in indexes[::step][:singles]]

        local_s, local_lat = _timed(get_batch(newest))
        _, local_single = _timed(singles_of(newest))
        # disjoint halves: a remote hit brings its page home, so each page is measured once
        _, remote_single = _timed(singles_of(oldest[local_n // 2 :]))
        remote_s, remote_lat = _timed(get_batch(oldest[: local_n // 2]))
        got = client.get_many(pool, OID, 0, count)
        verified = all(
            (s is PageStatus.HIT and p == data[i]) or (s is PageStatus.MISS and refused)
            for i, (s, p) in enumerate(zip(got.statuses, got.pages, strict=True))
        )
        final = client.stats()
    return {
        "pages": count,
        "put_pages_per_s": round(count / put_s),
        "put_p50_ms": round(percentile_ms(put_lat, 0.5), 2),
        "put_p99_ms": round(percentile_ms(put_lat, 0.99), 2),
        "local_get_pages_per_s": round(local_n / local_s),
        "local_get_p50_ms": round(percentile_ms(local_lat, 0.5), 2),
        "local_get_p99_ms": round(percentile_ms(local_lat, 0.99), 2),
        "local_single_get_p50_ms": round(percentile_ms(local_single, 0.5), 3),
        "remote_get_pages_per_s": round(local_n // 2 / remote_s),
        "remote_get_p50_ms": round(percentile_ms(remote_lat, 0.5), 2),
        "remote_get_p99_ms": round(percentile_ms(remote_lat, 0.99), 2),
        "remote_single_get_p50_ms": round(percentile_ms(remote_single, 0.5), 3),
        "batch_pages": BATCH,
        "refused": refused,
        "lost": final.remote_lost_pages,
        "verified": verified,
        "nodes": table,
    }


def start_cluster(nodes: int, limit: str, grace: float = 10.0, tls: bool = False) -> LocalCluster:
    """Nodes on free loopback ports; node 1's pool limited to `limit`; with `tls`, mTLS between
    the nodes and TLS for clients."""
    common = [*FAST_PEERS, "--grace", str(grace)]
    per_node = [["--pool-limit", limit]]
    return LocalCluster(nodes, common=common, per_node=per_node, tls=tls).start()
