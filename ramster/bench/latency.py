# `ramster bench latency`: what bulk work does to a small call's latency, and how bulk throughput
# scales with client processes, against one node in one run.
#
# Phases, all on the same node: (1) idle: this process times `singles` one-page unary gets, one
# at a time; (2) loaded: the same gets while another process streams put and get batches (the
# bulk client of `ramster bench node`: `batch` pages, `window` in flight) over its own pool,
# round after round, from before the first timed get until after the last; (3) scaling: 1, 2, 4
# (`clients`) processes each put then get their share of `pages` pages through their own stream,
# started together at a barrier, and the aggregate pages/s is every page over the span from the
# first start to the last finish.  Every page read is compared with the page put.  Idle and
# loaded numbers come from the same run and node, so their ratio holds even on a shared machine
# whose absolute speed drifts; repeat the run and take medians.
#
# The node's loop-lag histogram (ramster_event_loop_lag_seconds) and its threads' CPU time by
# role (ramster_thread_cpu_seconds_total) are scraped around each timed phase when the metrics
# port is known, giving the stall distribution the node itself saw and whether its event loop
# was saturated (cores by role over the phase).  With
# `cluster`, the node under test is node 1 of a local 3-node cluster whose peers heartbeat every
# 0.1 s and mark a peer down after 0.5 s of silence; both peers are polled through the loaded
# phase, and any moment either saw fewer than 2 peers up is reported (a busy node must not look
# dead).  Client processes are spawned, not forked: a fork of a process with gRPC threads is
# unsafe.  The clients share the machine with the node.
#
# The bulk client runs at a lower CPU priority (`bulk_nice`, 10 by default; 0 keeps it level).
# A node's bulk traffic comes from other hosts; here its client is a busy process beside the
# node, and on a small machine the kernel's scheduler then preempts the node's event loop (or
# the single-get client) for a few milliseconds now and then, which no node can help.  Measured
# on 2 cores: level, the node's own loop-lag gauge showed stalls over 1 ms in 1-2% of samples and
# the loaded p99 was 2.3-2.6 ms; niced, no stall over 1 ms, p99 1.8-1.9 ms, and the bulk client
# moved as many pages (the node, not its CPU share, bounds it).  The JSON says which was used.
from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ramster.bench.corpus import load_corpus
from ramster.bench.node import batches, page_at, percentile_ms, pipeline
from ramster.bench.report import Progress
from ramster.bench.scrape import families, thread_cpu
from ramster.client import AsyncClient, GetResult, KeyRange, Outcome, PageStatus
from ramster.client.aio import Stream
from ramster.client.cluster import LocalCluster
from ramster.client.local import LocalNode
from ramster.wire import keep_freed_memory

SINGLE_OID = 0
SINGLE_PAGES = 8192  # distinct pages the single gets spread over
LOOP_LAG = "ramster_event_loop_lag_seconds"
FAST_HEARTBEATS = ("--heartbeat-interval", "0.1", "--down-after", "0.5")
POLL_SECONDS = 0.05


def run(
    corpus: str,
    target: str | None,
    metrics: str | None,
    *,
    singles: int = 2000,
    batch: int = 1024,
    window: int = 4,
    pages: int = 65536,
    clients: Sequence[int] = (1, 2, 4),
    cluster: bool = False,
    pool_limit: str = "2Gi",
    bulk_nice: int = 10,
) -> dict[str, Any]:
    """Measure the node at `target` (metrics at `metrics`, if given), or a node started for the
    run (alone, or as node 1 of a local cluster)."""
    keep_freed_memory()
    with _node_under_test(target, metrics, cluster, pool_limit) as (where, scrape_at, peers):
        return asyncio.run(
            _run(corpus, where, scrape_at, peers, singles, batch, window, pages, clients, bulk_nice)
        )


@contextmanager
def _node_under_test(
    target: str | None, metrics: str | None, cluster: bool, pool_limit: str
) -> Iterator[tuple[str, str | None, list[str]]]:
    """(target, metrics HOST:PORT or None, peer targets to poll) of the node to measure."""
    if target:
        yield target, metrics, []
    elif cluster:
        nodes = LocalCluster(3, common=["--pool-limit", pool_limit, *FAST_HEARTBEATS])
        try:
            nodes.start()
            first = nodes.nodes[0]
            yield first.target, f"127.0.0.1:{first.metrics_port}", nodes.targets[1:]
        finally:
            for node in nodes.nodes:
                node.kill()
    else:
        with LocalNode("--pool-limit", pool_limit) as node:
            yield node.target, f"127.0.0.1:{node.metrics_port}", []


async def _run(
    corpus: str,
    target: str,
    metrics: str | None,
    peers: list[str],
    singles: int,
    batch: int,
    window: int,
    pages: int,
    clients: Sequence[int],
    bulk_nice: int,
) -> dict[str, Any]:
    data = load_corpus(corpus)
    spread = min(SINGLE_PAGES, len(data))
    result: dict[str, Any] = {"target": target, "singles": singles, "bulk_batch_pages": batch}
    result["bulk_client_nice"] = bulk_nice
    ctx = multiprocessing.get_context("spawn")
    async with AsyncClient(target, timeout=120) as client:
        pool = await client.create_pool("persistent")
        try:
            outcomes = await client.put_many(pool, SINGLE_OID, 0, data[:spread])
            stored = [i for i, outcome in enumerate(outcomes) if not outcome.refused]
            lag = NodeMeter(metrics)
            idle, bad = await _single_gets(client, pool, data, stored, singles)
            result |= _latency("idle", idle) | lag.report("idle")
            stop, ready = ctx.Event(), ctx.Event()
            queue: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
            bulk = ctx.Process(
                target=_bulk_client,
                args=(target, corpus, batch, window, pages, bulk_nice, ready, stop, queue),
                name="bulk",
            )
            bulk.start()
            try:
                await asyncio.to_thread(ready.wait)
                lag = NodeMeter(metrics)
                measured = asyncio.Event()
                watch = asyncio.create_task(_watch_peers(peers, measured))
                loaded, bad_loaded = await _single_gets(client, pool, data, stored, singles)
                lag_loaded = lag.report("loaded")
                measured.set()
                polls, seen_down = await watch
            finally:
                stop.set()
                moved = await asyncio.to_thread(queue.get, True, 600)
                bulk.join()
            result |= _latency("loaded", loaded) | lag_loaded
            result["loaded_p50_over_idle"] = _ratio(loaded, idle, 0.5)
            result["loaded_p99_over_idle"] = _ratio(loaded, idle, 0.99)
            result["bulk_pages_per_s_while_loaded"] = moved["pages_per_s"]
            if peers:
                result["peer_polls"] = polls
                result["peer_polls_seeing_a_node_down"] = seen_down
            bad += bad_loaded + moved["bad"]
        finally:
            await client.destroy_pool(pool)
    for count in clients:
        put_rate, get_rate, bad_scaled = await asyncio.to_thread(
            _scaling, ctx, target, corpus, batch, window, pages, count
        )
        result[f"put_pages_per_s_{count}_clients"] = put_rate
        result[f"get_pages_per_s_{count}_clients"] = get_rate
        bad += bad_scaled
    result["verified"] = bad == 0
    return result


def _latency(phase: str, latencies: list[float]) -> dict[str, float]:
    return {
        f"{phase}_get_p50_ms": percentile_ms(latencies, 0.5),
        f"{phase}_get_p99_ms": percentile_ms(latencies, 0.99),
        f"{phase}_get_max_ms": max(latencies, default=0.0) * 1000,
    }


def _ratio(loaded: list[float], idle: list[float], q: float) -> float:
    base = percentile_ms(idle, q)
    return percentile_ms(loaded, q) / base if base else 0.0


async def _single_gets(
    client: AsyncClient, pool: int, data: list[bytes], stored: list[int], count: int
) -> tuple[list[float], int]:
    """Round trips of `count` one-page unary gets of the `stored` pages; latencies and
    mismatches."""
    latencies = []
    bad = 0
    for n in range(count):
        index = stored[n * 7919 % len(stored)]  # a prime stride visits the pages out of order
        start = time.perf_counter()
        page = await client.get(pool, SINGLE_OID, index)
        latencies.append(time.perf_counter() - start)
        bad += page != data[index]
    return latencies, bad


async def _watch_peers(peers: list[str], done: asyncio.Event) -> tuple[int, int]:
    """Poll every peer's view of the cluster until `done`: (polls, polls that saw fewer peers up
    than there are)."""
    polls = down = 0
    clients = [AsyncClient(peer, timeout=5) for peer in peers]
    try:
        while peers and not done.is_set():
            for peer in clients:
                stats = await peer.stats()
                polls += 1
                down += stats.peers_up < stats.peers
            await asyncio.sleep(POLL_SECONDS)
    finally:
        for peer in clients:
            await peer.close()
    return polls, down


class NodeMeter:
    """What the node itself saw since this meter was made: its loop-lag histogram (share of
    samples over 1 and 2 ms, the bucket holding the 99th percentile) and the cores its threads
    used, by role (event loop, codec workers, gRPC's threads, the rest)."""

    def __init__(self, metrics: str | None) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.before = self._read()

    def _read(self) -> tuple[dict[float, float], dict[str, float]]:
        if not self.metrics:
            return {}, {}
        scraped = families(self.metrics)
        buckets = {
            float(s.labels["le"]): s.value
            for family in scraped
            if family.name == LOOP_LAG
            for s in family.samples
            if s.name == f"{LOOP_LAG}_bucket"
        }
        return buckets, thread_cpu(scraped)

    def report(self, phase: str) -> dict[str, Any]:
        if not self.metrics:
            return {}
        seconds = time.monotonic() - self.started
        (before, cpu_before), (after, cpu_after) = self.before, self._read()
        out: dict[str, Any] = {
            f"{phase}_node_cores_by_thread": {
                role: round((cpu - cpu_before.get(role, 0.0)) / seconds, 2)
                for role, cpu in cpu_after.items()
            }
        }
        counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
        total = counts.get(float("inf"), 0.0)
        if not total:
            return out
        p99 = next(le for le, n in counts.items() if n >= 0.99 * total)
        return out | {
            f"{phase}_loop_lag_samples": total,
            f"{phase}_loop_lag_over_1ms": 1 - counts.get(0.001, 0.0) / total,
            f"{phase}_loop_lag_over_2ms": 1 - counts.get(0.002, 0.0) / total,
            f"{phase}_loop_lag_p99_bucket_ms": p99 * 1000,
        }


# -- client processes ---------------------------------------------------------------------------
class BulkPages:
    """`pages` pages of a corpus put into and read back from one pool in batches through a
    stream (`window` batches in flight), every page read compared with the page put."""

    def __init__(self, pool: int, data: list[bytes], pages: int, batch: int, window: int) -> None:
        self.pool, self.data, self.batch, self.window = pool, data, batch, window
        self.ranges = batches(pages, batch)
        self.outcomes: dict[int, list[Outcome]] = {}
        self.bad = 0  # pages read back wrong, missing without a refusal, or corrupt
        self.quiet = Progress("bulk", pages)
        self.quiet.enabled = False

    async def put_all(self, stream: Stream) -> None:
        await pipeline(stream, self.ranges, self._put, self._stored, self.window, self.quiet)

    async def get_all(self, stream: Stream) -> None:
        await pipeline(stream, self.ranges, self._get, self._check, self.window, self.quiet)

    def _put(self, stream: Stream, keys: KeyRange) -> Any:
        first = keys.oid * self.batch
        return stream.put_batch(
            self.pool, keys, [page_at(self.data, first + i) for i in range(keys.count)]
        )

    def _stored(self, keys: KeyRange, result: list[Outcome]) -> None:
        self.outcomes[keys.oid] = result

    def _get(self, stream: Stream, keys: KeyRange) -> Any:
        return stream.get_batch(self.pool, keys)

    def _check(self, keys: KeyRange, result: GetResult) -> None:
        first = keys.oid * self.batch
        for i, (status, page) in enumerate(zip(result.statuses, result.pages, strict=True)):
            refused = self.outcomes[keys.oid][i].refused
            if status is PageStatus.HIT:
                self.bad += refused or page != page_at(self.data, first + i)
            else:
                self.bad += status is PageStatus.CORRUPT or not refused


def _bulk_client(
    target: str,
    corpus: str,
    batch: int,
    window: int,
    pages: int,
    nice: int,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    queue: multiprocessing.Queue[dict[str, Any]],
) -> None:
    """Put then get `pages` pages, round after round, until `stop` (`ready` once the first
    round's puts are in); report pages/s and mismatches.  Runs `nice` steps below normal
    CPU priority (see the header)."""
    os.nice(nice)
    keep_freed_memory()
    data = load_corpus(corpus)

    async def main() -> dict[str, Any]:
        moved = bad = 0
        async with AsyncClient(target, timeout=300) as client:
            pool = await client.create_pool("persistent")
            began = time.perf_counter()
            try:
                while not stop.is_set():
                    bulk = BulkPages(pool, data, pages, batch, window)
                    async with client.stream() as stream:
                        await bulk.put_all(stream)
                        ready.set()
                        await bulk.get_all(stream)
                    moved += 2 * pages
                    bad += bulk.bad
            finally:
                elapsed = time.perf_counter() - began
                await client.destroy_pool(pool)
        return {"pages_per_s": moved / elapsed, "bad": bad}

    queue.put(asyncio.run(main()))


def _scaling(
    ctx: Any, target: str, corpus: str, batch: int, window: int, pages: int, count: int
) -> tuple[float, float, int]:
    """Aggregate put and get pages/s of `count` client processes sharing `pages` between them,
    and mismatches."""
    barrier = ctx.Barrier(count)
    queue = ctx.Queue()
    share = pages // count
    procs = [
        ctx.Process(
            target=_scaling_client,
            args=(target, corpus, batch, window, share, barrier, queue),
            name=f"client{n}",
        )
        for n in range(count)
    ]
    for proc in procs:
        proc.start()
    marks = [queue.get(True, 600) for _ in procs]
    for proc in procs:
        proc.join()
    put_span = max(m["put_end"] for m in marks) - min(m["put_start"] for m in marks)
    get_span = max(m["get_end"] for m in marks) - min(m["get_start"] for m in marks)
    total = share * count
    return total / put_span, total / get_span, sum(m["bad"] for m in marks)


def _scaling_client(
    target: str,
    corpus: str,
    batch: int,
    window: int,
    pages: int,
    barrier: multiprocessing.synchronize.Barrier,
    queue: multiprocessing.Queue[dict[str, Any]],
) -> None:
    """Put then get `pages` pages, each phase begun at the barrier with the other clients;
    report when each phase began and ended (time.monotonic is one clock for every process) and
    mismatches."""
    keep_freed_memory()
    data = load_corpus(corpus)

    async def main() -> dict[str, Any]:
        marks: dict[str, Any] = {}
        async with AsyncClient(target, timeout=300) as client:
            pool = await client.create_pool("persistent")
            bulk = BulkPages(pool, data, pages, batch, window)
            try:
                async with client.stream() as stream:
                    for phase, step in (("put", bulk.put_all), ("get", bulk.get_all)):
                        await asyncio.to_thread(barrier.wait)
                        marks[f"{phase}_start"] = time.monotonic()
                        await step(stream)
                        marks[f"{phase}_end"] = time.monotonic()
            finally:
                await client.destroy_pool(pool)
        return marks | {"bad": bulk.bad}

    queue.put(asyncio.run(main()))
