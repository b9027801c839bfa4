# `ramster bench soak`: a long, seeded mixed workload with a model of what every key holds.
#
# One client overwrites, reads and flushes a fixed set of keys of one persistent pool at random,
# in batches, through node 1 of a cluster (a local one whose node 1 has a small pool, so pages
# keep moving to peers and back; or any running node with --target).  The model knows, per key,
# the version last acknowledged (or that it was flushed), and every page carries its key and
# version in its first 20 bytes, so each answer is judged exactly:
#
#   wrong      a hit whose bytes are not the last acknowledged version (or a hit of a flushed key)
#   transient  a non-hit for a key that exists, which a retry (up to `retry_seconds`) serves
#   lost       a non-hit for a key that exists that no retry serves
#
# A persistent pool must never lose or misreport a page when nothing is failing, so the goal is
# 0 / 0 / 0.  It also samples the RSS of every local node over time and the latency of each batch.
# Trade-off: one client and sequential batches, so the measured latency is the node's, not a
# queue's; the model check costs the client a byte comparison per page.
from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from ramster.bench.node import percentile_ms
from ramster.bench.report import Progress, rss_bytes
from ramster.client import Client, PageStatus
from ramster.client.cluster import LocalCluster
from ramster.zcache.codec import compress

OID = 3
STAMP = struct.Struct("<QQI")  # oid, index, version


def stamped(base: list[bytes], index: int, version: int) -> bytes:
    page = base[(index * 7 + version) % len(base)]
    return STAMP.pack(OID, index, version) + page[STAMP.size :]


@dataclass
class Soak:
    client: Client
    pool: int
    base: list[bytes]
    keys: int
    batch: int
    seed: int
    retry_seconds: float = 5.0
    model: dict[int, int] = field(default_factory=dict)  # index -> version (absent: flushed)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("puts", "gets", "flushes", "batches", "wrong", "transient", "lost"), 0
        )
    )
    latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def fill(self) -> None:
        for start in range(0, self.keys, 256):
            indexes = list(range(start, min(self.keys, start + 256)))
            self._put(indexes)

    def step(self) -> None:
        indexes = self.rng.sample(range(self.keys), self.batch)
        roll = self.rng.random()
        started = time.perf_counter()
        if roll < 0.4:
            self._put(indexes)
        elif roll < 0.9:
            self._get(indexes)
        else:
            self._flush(indexes[: self.batch // 4])
        self.latencies.append(time.perf_counter() - started)
        self.counts["batches"] += 1

    def _put(self, indexes: list[int]) -> None:
        versions = [self.model.get(i, 0) + 1 for i in indexes]
        pages = [stamped(self.base, i, v) for i, v in zip(indexes, versions, strict=True)]
        outcomes = self.client.put_batch(self.pool, [(OID, i) for i in indexes], pages)
        for i, v, outcome in zip(indexes, versions, outcomes, strict=True):
            if outcome.refused:
                raise RuntimeError(f"the node refused page {i} ({outcome.reason})")
            self.model[i] = v
        self.counts["puts"] += len(indexes)

    def _flush(self, indexes: list[int]) -> None:
        for i in indexes:
            self.client.flush_page(self.pool, OID, i)
            self.model.pop(i, None)
        self.counts["flushes"] += len(indexes)

    def _get(self, indexes: list[int]) -> None:
        got = self.client.get_batch(self.pool, [(OID, i) for i in indexes])
        self.counts["gets"] += len(indexes)
        for i, status, page in zip(indexes, got.statuses, got.pages, strict=True):
            self._judge(i, status, page)

    def _judge(self, index: int, status: PageStatus, page: bytes | None) -> None:
        want = self.model.get(index)
        if status is PageStatus.HIT:
            if want is None or page != stamped(self.base, index, want):
                self.counts["wrong"] += 1
            return
        if want is None:
            if status is not PageStatus.MISS:
                self.counts["wrong"] += 1  # a flushed page must simply be gone
            return
        deadline = time.monotonic() + self.retry_seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = self.client.get_batch(self.pool, [(OID, index)])
            if again.statuses[0] is PageStatus.HIT:
                right = again.pages[0] == stamped(self.base, index, want)
                self.counts["transient" if right else "wrong"] += 1
                return
        self.counts["lost"] += 1


def run(
    base: list[bytes],
    seconds: float,
    keys: int = 30_000,
    batch: int = 64,
    seed: int = 1,
    target: str | None = None,
    cluster: LocalCluster | None = None,
) -> dict[str, Any]:
    """Soak `target` (or node 1 of `cluster`) for `seconds`; the report."""
    base = [page for page in base if len(compress(page)) < 3500]  # the pool refuses the rest
    if not base:
        raise ValueError("the corpus has no page that compresses")
    where = target or (cluster.targets[0] if cluster else "")
    pids = [n.process.pid for n in cluster.nodes if n.process] if cluster else []
    rss: list[list[int]] = []
    with Client(where, timeout=60) as client:
        soak = Soak(client, client.create_pool(), base, keys, batch, seed)
        soak.fill()
        progress = Progress("soak seconds", int(seconds))
        started = last_sample = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            soak.step()
            if time.monotonic() - last_sample >= max(1.0, seconds / 20):
                last_sample = time.monotonic()
                rss.append([rss_bytes(pid) for pid in pids])
                progress.update(int(elapsed))
        progress.update(int(seconds))
        if pids:
            rss.append([rss_bytes(pid) for pid in pids])
        stats = client.stats()
    report: dict[str, Any] = {
        "seconds": round(time.monotonic() - started, 1),
        **soak.counts,
        "unavailable_counted_by_node": stats.unavailable,
        "batch_p50_ms": round(percentile_ms(soak.latencies, 0.5), 3),
        "batch_p99_ms": round(percentile_ms(soak.latencies, 0.99), 3),
        "batch_max_ms": round(max(soak.latencies, default=0) * 1000, 3),
    }
    if rss:
        warm = rss[len(rss) // 4]  # after warm-up: a quarter of the way in
        report["rss_mib_over_time"] = [[round(b / 2**20) for b in row] for row in rss]
        report["rss_growth_after_warmup"] = [
            round(end / start - 1, 3) if start else 0.0
            for start, end in zip(warm, rss[-1], strict=True)
        ]
    return report
