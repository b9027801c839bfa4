# `ramster bench node`: drive a node over the wire with a page corpus and verify every page.
#
# Puts and gets go through one pipelined Stream in batches (`batch` pages each, `window`
# batches in flight), so the node never waits for the client; the client belongs in another
# process than the node (with no --target, a node is started as a subprocess for the run).
# Per-batch latency is from sending a request to its reply arriving, so it includes the time the
# request queued behind the window.  Then single-page unary gets measure one round trip each.
# Verification: every hit equals the page put under its key, every miss is a page the node
# refused, and no page comes back corrupt.
from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from ramster.bench.report import Progress
from ramster.client import AsyncClient, GetResult, KeyRange, Outcome, PageStatus
from ramster.client.aio import Stream
from ramster.client.local import LocalNode
from ramster.client.tls import PathLike
from ramster.wire import keep_freed_memory
from ramster.zcache import PAGE_SIZE


def run(
    pages: list[bytes],
    target: str | None,
    count: int,
    batch: int = 1024,
    window: int = 4,
    singles: int = 2000,
    tls: Mapping[str, PathLike | None] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Measure the node at `target` (or a fresh local node) with `count` pages of the corpus;
    `tls` holds the client's TLS arguments (tls_ca, tls_cert, tls_key) for a node serving TLS,
    `token` the bearer token for a node run with --tokens."""
    keep_freed_memory()
    if target:
        return asyncio.run(_run(pages, target, count, batch, window, singles, tls or {}, token))
    with LocalNode() as node:
        return asyncio.run(_run(pages, node.target, count, batch, window, singles, {}, None))


def page_at(pages: list[bytes], n: int) -> bytes:
    return pages[n % len(pages)]


def batches(count: int, batch: int) -> list[KeyRange]:
    """The key ranges of a run: object b holds pages 0..batch-1 of batch b."""
    return [
        KeyRange(b, 0, min(batch, count - first)) for b, first in enumerate(range(0, count, batch))
    ]


def percentile_ms(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def pipeline(
    stream: Stream,
    ranges: list[KeyRange],
    send: Callable[[Stream, KeyRange], Any],
    accept: Callable[[KeyRange, Any], None],
    window: int,
    progress: Progress,
) -> tuple[float, list[float]]:
    """Send every range with at most `window` in flight; elapsed seconds and per-batch latency."""
    latencies: list[float] = []
    in_flight: deque[tuple[KeyRange, asyncio.Future[Any]]] = deque()
    done = 0

    def timed(start: float) -> Callable[[asyncio.Future[Any]], None]:
        return lambda _: latencies.append(time.perf_counter() - start)

    async def settle() -> None:
        nonlocal done
        keys, future = in_flight.popleft()
        accept(keys, await future)
        done += keys.count
        progress.update(done)

    began = time.perf_counter()
    for keys in ranges:
        sent = time.perf_counter()
        future = await send(stream, keys)
        future.add_done_callback(timed(sent))
        in_flight.append((keys, future))
        if len(in_flight) >= window:
            await settle()
    while in_flight:
        await settle()
    return time.perf_counter() - began, latencies


async def _run(
    pages: list[bytes],
    target: str,
    count: int,
    batch: int,
    window: int,
    singles: int,
    tls: Mapping[str, PathLike | None],
    token: str | None,
) -> dict[str, Any]:
    ranges = batches(count, batch)
    outcomes: dict[int, list[Outcome]] = {}
    mismatches = 0

    def put(stream: Stream, keys: KeyRange) -> Any:
        first = keys.oid * batch
        return stream.put_batch(pool, keys, [page_at(pages, first + i) for i in range(keys.count)])

    def accept_put(keys: KeyRange, result: list[Outcome]) -> None:
        outcomes[keys.oid] = result

    def get(stream: Stream, keys: KeyRange) -> Any:
        return stream.get_batch(pool, keys)

    def accept_get(keys: KeyRange, result: GetResult) -> None:
        nonlocal mismatches
        first = keys.oid * batch
        for i, (status, page) in enumerate(zip(result.statuses, result.pages, strict=True)):
            refused = outcomes[keys.oid][i].refused
            if status is PageStatus.HIT:
                mismatches += refused or page != page_at(pages, first + i)
            else:
                mismatches += status is PageStatus.CORRUPT or not refused

    async with AsyncClient(
        target,
        timeout=120,
        tls_ca=tls.get("tls_ca"),
        tls_cert=tls.get("tls_cert"),
        tls_key=tls.get("tls_key"),
        token=token,
    ) as client:
        pool = await client.create_pool("persistent")
        try:
            async with client.stream() as stream:
                put_s, put_lat = await pipeline(
                    stream, ranges, put, accept_put, window, Progress("put", count)
                )
                get_s, get_lat = await pipeline(
                    stream, ranges, get, accept_get, window, Progress("get", count)
                )
            single_lat, single_bad = await _single_gets(
                client, pool, outcomes, pages, batch, singles
            )
        finally:
            await client.destroy_pool(pool)
    tally = Counter(o.reason for result in outcomes.values() for o in result)
    mb = count * PAGE_SIZE / 1e6
    return {
        "target": target,
        "pages": count,
        "batch_pages": batch,
        "window": window,
        "stored": tally["stored"] + tally["stored_raw"],
        "same_filled": tally["same_filled"],
        "refused": {r: tally[r] for r in ("poor_compression", "no_room")},
        "put_pages_per_s": count / put_s,
        "put_mb_per_s": mb / put_s,
        "put_p50_ms": percentile_ms(put_lat, 0.5),
        "put_p99_ms": percentile_ms(put_lat, 0.99),
        "get_pages_per_s": count / get_s,
        "get_mb_per_s": mb / get_s,
        "get_p50_ms": percentile_ms(get_lat, 0.5),
        "get_p99_ms": percentile_ms(get_lat, 0.99),
        "single_gets": len(single_lat),
        "single_get_p50_ms": percentile_ms(single_lat, 0.5),
        "single_get_p99_ms": percentile_ms(single_lat, 0.99),
        "single_get_mean_ms": statistics.fmean(single_lat) * 1000 if single_lat else 0.0,
        "verified": mismatches == 0 and single_bad == 0,
    }


async def _single_gets(
    client: AsyncClient,
    pool: int,
    outcomes: dict[int, list[Outcome]],
    pages: list[bytes],
    batch: int,
    singles: int,
) -> tuple[list[float], int]:
    """Round trips of one-page gets spread over the stored pages; latencies and mismatches."""
    stored = [
        (oid, i)
        for oid, result in outcomes.items()
        for i, outcome in enumerate(result)
        if not outcome.refused
    ]
    if not stored:
        return [], 0
    step = max(1, len(stored) // singles)
    latencies: list[float] = []
    bad = 0
    for oid, index in stored[::step][:singles]:
        start = time.perf_counter()
        page = await client.get(pool, oid, index)
        latencies.append(time.perf_counter() - start)
        bad += page != page_at(pages, oid * batch + index)
    return latencies, bad
