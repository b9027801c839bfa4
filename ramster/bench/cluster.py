# `ramster bench cluster` and `ramster demo`: a local cluster on loopback whose first node's pool
# is far smaller than the data put through it, so most pages go to the peers.
#
# run() starts the cluster (LocalCluster: real node processes), puts the pages through node 1 in
# batches (per-RPC latency recorded), waits until every evicted page is placed, reads the node
# table, then times gets of pages still in node 1's RAM (the newest, "local hits") and of pages
# parked on peers (the oldest, "remote hits"), as batches and as single-page gets (remote batches
# in order, as a client reading a region back does, which node readahead serves, and the same
# number scattered out of order, which it does not: remote_unordered_get_vs_local), and finally
# reads every page back and compares (clients speak TLS when the cluster does).  The batch gets
# run in rounds: each round reads the same local pages again, then a region of remote pages no
# round read before, then scattered ones, and a ratio is the median of the rounds' ratios (each
# round's is reported too), so a change of load on the machine weighs on local and remote
# alike and one slow batch does not decide it.  A round reads up to 2048 local pages and up to
# 4096 remote ones each way (16 MiB: at 4 MiB one slow batch moved a round's ratio by 0.1).  Each
# remote page is read once, which only marks it (zcache brings an evicted page home on its
# second get), so what is timed is the fetch, as a client reading a cold region back sees it.
#
# In the same run, a `baseline` node (same pool limit, no peers: its evictions go to its backing
# file) takes the same puts, for spill_put_vs_baseline.  Last, with `repair`, the last node (a
# holder) is SIGKILLed and node 1's re-replication is timed until no page is short of its
# copies: repair_pages_per_s counts from the first page placed again (detecting the death takes
# --down-after) and repair_seconds from the kill.
from __future__ import annotations

import random
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ramster.bench.node import percentile_ms
from ramster.bench.report import Progress, rss_bytes
from ramster.client import Client, PageStatus
from ramster.client.cluster import LocalCluster
from ramster.client.local import LocalNode

OID = 1
BATCH = 256
FAST_PEERS = ["--heartbeat-interval", "0.25", "--down-after", "3"]
TRIMS = "ramster_heap_trims_total"


def _timed(calls: Sequence[Callable[[], Any]]) -> tuple[float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - started, latencies


@dataclass
class Rounds:
    """The timed rounds of one kind of get, `pages` pages each."""

    pages: int
    seconds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def add(self, timed: tuple[float, list[float]]) -> None:
        self.seconds.append(timed[0])
        self.latencies += timed[1]

    def pages_per_s(self) -> float:
        return self.pages * len(self.seconds) / sum(self.seconds) if self.pages else 0.0

    def ratios(self, other: Rounds) -> list[float]:
        """Per round, this rate over the other's in the same round."""
        return [
            round(other.seconds[r] * self.pages / (s * other.pages), 3) if s and self.pages else 0.0
            for r, s in enumerate(self.seconds)
        ]

    def vs(self, other: Rounds) -> float:
        """The median of the rounds' ratios."""
        return round(statistics.median(self.ratios(other)), 3) if self.seconds else 0.0


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


def wait_trimmed(cluster: LocalCluster, trims: list[float], timeout: float = 10) -> None:
    """Until every node has trimmed its heap since `trims` were read (node/heap.py: once the
    traffic pauses), so RSS is measured at rest."""
    deadline = time.monotonic() + timeout
    for node, before in zip(cluster.nodes, trims, strict=True):
        while metric_value(node, TRIMS) <= before and time.monotonic() < deadline:
            time.sleep(0.1)


def wait_placed(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.stats().remote_outbox and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Puts:
    pool: int
    seconds: float
    latencies: list[float]  # per batch
    refused: int  # pages the node refused (poor compression, no room)


def put_all(client: Client, data: list[bytes], label: str) -> Puts:
    """Put `data` into a new pool in batches of BATCH pages."""
    pool = client.create_pool()
    progress = Progress(label, len(data))
    refused = 0

    def put(start: int) -> Callable[[], None]:
        def call() -> None:
            nonlocal refused
            chunk = data[start : start + BATCH]
            refused += sum(1 for o in client.put_many(pool, OID, start, chunk) if o.refused)
            progress.update(start + len(chunk))

        return call

    seconds, latencies = _timed([put(s) for s in range(0, len(data), BATCH)])
    return Puts(pool, seconds, latencies, refused)


def baseline_puts(node: LocalNode, data: list[bytes]) -> dict[str, float]:
    """The same puts through a node without peers (it spills to its backing file)."""
    with node.client(timeout=120) as client:
        puts = put_all(client, data, "put (no peers)")
    return {
        "baseline_put_pages_per_s": round(len(data) / puts.seconds),
        "baseline_put_p50_ms": round(percentile_ms(puts.latencies, 0.5), 2),
    }


def repair_after_kill(cluster: LocalCluster, timeout: float = 600) -> dict[str, float]:
    """SIGKILL the last node and time node 1's re-replication of what it held."""
    owner = cluster.nodes[0]
    before = metric_value(owner, "ramster_rereplication_pages_total")
    killed = time.monotonic()
    cluster.nodes[-1].kill()
    first = done = 0.0
    deadline = killed + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        moved = metric_value(owner, "ramster_rereplication_pages_total") - before
        if moved and not first:
            first = time.monotonic()
        if first and not short_of_copies(owner):
            done = time.monotonic()
            break
    repaired = metric_value(owner, "ramster_rereplication_pages_total") - before
    return {
        "repair_pages": int(repaired),
        "repair_pages_per_s": round(repaired / (done - first)) if done > first else 0.0,
        "repair_seconds": round(done - killed, 2) if done else -1.0,
    }


def short_of_copies(node: LocalNode, replicas: int = 2) -> int:
    """Pages of `node` with fewer live copies than `replicas`, or still waiting to be placed."""
    short = metric_samples(node, "ramster_remote_replicas_pages")
    waiting = metric_value(node, "ramster_rereplication_pending_pages")
    waiting += metric_value(node, "ramster_remote_outbox_pages")
    return int(
        waiting + sum(v for labels, v in short if int(labels.get("copies", replicas)) < replicas)
    )


def run(
    cluster: LocalCluster,
    pages: list[bytes],
    count: int,
    singles: int = 200,
    rounds: int = 4,
    baseline: LocalNode | None = None,
    repair: bool = False,
) -> dict[str, Any]:
    """Drive a started cluster through its first node; the measurements and node table."""
    data = [pages[i % len(pages)] for i in range(count)]
    extra: dict[str, Any] = baseline_puts(baseline, data) if baseline else {}
    with cluster.nodes[0].client(timeout=120) as client:
        before = memory(cluster)
        trims = [metric_value(node, TRIMS) for node in cluster.nodes]
        puts = put_all(client, data, "put")
        pool, put_s, put_lat, refused = puts.pool, puts.seconds, puts.latencies, puts.refused
        wait_placed(client)
        wait_trimmed(cluster, trims)
        after = memory(cluster)
        table = node_table(cluster)
        local_n = min(count // 10, 2048)
        half = local_n // 2
        span = max(half, min(4 * half, (count - local_n) // (2 * rounds + 2)))
        newest = list(range(count - local_n, count))
        ordered = [list(range(r * span, (r + 1) * span)) for r in range(rounds)]

        def get_batch(indexes: list[int]) -> list[Callable[[], Any]]:
            return [
                partial(client.get_many, pool, OID, indexes[s], min(BATCH, len(indexes) - s))
                for s in range(0, len(indexes), BATCH)
            ]

        def singles_of(indexes: list[int]) -> list[Callable[[], Any]]:
            step = max(1, len(indexes) // singles)
            return [partial(client.get, pool, OID, i) for i in indexes[::step][:singles]]

        # the same number of remote pages per round in batches that continue no stream (a gap
        # after each, visited out of order): what a get costs without readahead
        base = rounds * span + half
        scattered = range(base, min(count - local_n, base + 4 * rounds * span), 2 * BATCH)
        per_round = min(len(scattered) // rounds, span // BATCH)
        starts = random.Random(1).sample(scattered, per_round * rounds)
        local = Rounds(local_n)
        remote = Rounds(span)
        unordered = Rounds(per_round * BATCH)
        for r in range(rounds):  # local and remote take turns: a change of load weighs on both
            local.add(_timed(get_batch(newest)))
            remote.add(_timed(get_batch(ordered[r])))
            group = starts[r * per_round : (r + 1) * per_round]
            unordered.add(_timed([partial(client.get_many, pool, OID, s, BATCH) for s in group]))
        # single gets after the batches: a node gives batches smaller steps for a while after
        # a single get (node.fairness.SmallFirst), which must not weigh on one batch measure
        # and not the other.  Local and remote single gets take turns, so a change of load on
        # the machine weighs on both alike; remote pages no batch read, each read once, so
        # each is a cold page's fetch (a second read would bring it home)
        pairs = zip(singles_of(newest), singles_of(list(range(rounds * span, base))), strict=False)
        _, both = _timed([call for pair in pairs for call in pair])
        local_single, remote_single = both[0::2], both[1::2]
        got = client.get_many(pool, OID, 0, count)
        verified = all(
            (s is PageStatus.HIT and p == data[i]) or (s is PageStatus.MISS and refused)
            for i, (s, p) in enumerate(zip(got.statuses, got.pages, strict=True))
        )
        outbox_refused = metric_value(cluster.nodes[0], "ramster_remote_outbox_refused_total")
        if repair:
            extra |= repair_after_kill(cluster)
        final = client.stats()
    if baseline:
        extra["spill_put_vs_baseline"] = round(count / put_s / extra["baseline_put_pages_per_s"], 3)
    return {
        "pages": count,
        "put_pages_per_s": round(count / put_s),
        "put_p50_ms": round(percentile_ms(put_lat, 0.5), 2),
        "put_p99_ms": round(percentile_ms(put_lat, 0.99), 2),
        "local_get_pages_per_s": round(local.pages_per_s()),
        "local_get_p50_ms": round(percentile_ms(local.latencies, 0.5), 2),
        "local_get_p99_ms": round(percentile_ms(local.latencies, 0.99), 2),
        "local_single_get_p50_ms": round(percentile_ms(local_single, 0.5), 3),
        "remote_get_pages_per_s": round(remote.pages_per_s()),
        "remote_get_p50_ms": round(percentile_ms(remote.latencies, 0.5), 2),
        "remote_get_p99_ms": round(percentile_ms(remote.latencies, 0.99), 2),
        "remote_single_get_p50_ms": round(percentile_ms(remote_single, 0.5), 3),
        "remote_get_vs_local": remote.vs(local),
        "remote_get_vs_local_rounds": remote.ratios(local),
        "remote_unordered_get_vs_local": unordered.vs(local),
        "remote_single_get_p50_vs_local": round(
            percentile_ms(remote_single, 0.5) / max(percentile_ms(local_single, 0.5), 1e-9), 2
        ),
        **memory_report(before, after, table),
        "outbox_refused": int(outbox_refused),
        **extra,
        "batch_pages": BATCH,
        "refused": refused,
        "lost": final.remote_lost_pages,
        "verified": verified,
        "nodes": table,
    }


def memory(cluster: LocalCluster) -> list[dict[str, int]]:
    """Per node: its RSS, pool bytes, and foreign pool bytes (from its metrics)."""
    rows = []
    for node in cluster.nodes:
        with node.client(timeout=30) as client:
            s = client.stats()
        foreign = metric_value(node, "ramster_foreign_pool_size_bytes")
        pid = node.process.pid if node.process else 0
        rows.append({"rss": rss_bytes(pid), "pool": s.pool_size_bytes, "foreign": int(foreign)})
    return rows


def memory_report(
    before: list[dict[str, int]], after: list[dict[str, int]], table: list[dict[str, Any]]
) -> dict[str, float]:
    """What remotifying costs in RAM: the owner's growth beyond its pool per remote page, and
    each holder's growth per copy against the compressed bytes of a copy."""
    owner_growth = (after[0]["rss"] - before[0]["rss"]) - (after[0]["pool"] - before[0]["pool"])
    remote = table[0]["pages_remote"]
    held = sum(row["held_for_peers"] for row in table[1:])
    holder_growth = sum(a["rss"] - b["rss"] for a, b in zip(after[1:], before[1:], strict=True))
    foreign = sum(a["foreign"] for a in after[1:])
    evicted = table[0]["pages_remote"] + table[0]["pages_on_disk"]
    return {
        "owner_bytes_per_remote_page": round(owner_growth / remote, 1) if remote else 0.0,
        "holder_bytes_per_copy": round(holder_growth / held, 1) if held else 0.0,
        "holder_compressed_bytes_per_copy": round(foreign / held, 1) if held else 0.0,
        "evicted_to_peers_fraction": round(remote / evicted, 4) if evicted else 0.0,
    }


def metric_value(node: LocalNode, name: str) -> float:
    return sum(value for _, value in metric_samples(node, name))


def metric_samples(node: LocalNode, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) samples of metric `name` that `node` serves."""
    if not node.metrics_port:
        return []
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def start_cluster(
    nodes: int, pool_limit: str, grace: float = 10.0, tls: bool = False
) -> LocalCluster:
    """Nodes on free loopback ports; node 1's pool limited to `pool_limit`; with `tls`, mTLS
    between the nodes and TLS for clients."""
    common = [*FAST_PEERS, "--grace", str(grace)]
    per_node = [["--pool-limit", pool_limit]]
    return LocalCluster(nodes, common=common, per_node=per_node, tls=tls).start()
