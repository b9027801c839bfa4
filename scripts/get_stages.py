#!/usr/bin/env python3
# Where a single get's time goes under bulk load: `python scripts/get_stages.py --corpus FILE
# [--gets 2000] [--idle]`.
#
# The node runs in this process (node.server.Node on port 0), a bulk client in another (ramster.
# bench.latency's, 1024-page batches, 4 in flight; none with --idle) and a probe in a third,
# timing one-page gets one at a time (AsyncClient.get, on its Pages stream), as `ramster bench
# latency` does.  Each get is cut into two stages by timestamps on one clock (time.perf_counter
# is CLOCK_MONOTONIC, shared by every process): `to_handler`, from the probe's call to the
# servicer's get (the probe's send, the node's gRPC threads, and the loop iterations that read
# the message), and `reply`, from the servicer back to the probe.  The run-queue wait of each
# process's threads over the probe's gets is read from /proc (schedstat), to tell waiting for a
# core from waiting for the loop.  The wrapped method is the node's own (gets come one at a
# time, so its calls pair with the gets in order), which is why this is a script and not a node
# metric.
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.synchronize
import os
import time
from typing import Any

from inprocess import started_node

from node.servicer import TmemServicer
from ramster.bench import latency
from ramster.bench.corpus import load_corpus
from ramster.client import AsyncClient
from ramster.zcache import PageError

PAGES = 8192  # distinct pages the gets spread over
SERVED: list[float] = []  # when the servicer began each Get, and ended it
ENDED: list[float] = []


def _probe(
    target: str,
    corpus: str,
    gets: int,
    ready: multiprocessing.synchronize.Event,
    go: multiprocessing.synchronize.Event,
    queue: multiprocessing.Queue[list[tuple[float, float]]],
) -> None:
    """Store the pages, then (once `go`) time `gets` gets: (start, end) of each."""
    data = load_corpus(corpus)[:PAGES]

    async def main() -> list[tuple[float, float]]:
        async with AsyncClient(target, timeout=60) as client:
            pool = await client.create_pool("persistent")
            await client.put_many(pool, 0, 0, data)
            ready.set()
            await asyncio.to_thread(go.wait)
            times = []
            for n in range(gets):
                start = time.perf_counter()
                await client.get(pool, 0, n * 7919 % len(data))
                times.append((start, time.perf_counter()))
            return times

    queue.put(asyncio.run(main()))


def _wrap_node() -> None:
    get = TmemServicer._get_page

    async def timed_get(
        self: TmemServicer, pool: int, oid: int, index: int, exclusive: bool
    ) -> bytes | PageError | None:
        SERVED.append(time.perf_counter())
        try:
            return await get(self, pool, oid, index, exclusive)
        finally:
            ENDED.append(time.perf_counter())

    TmemServicer._get_page = timed_get  # type: ignore[method-assign]


def _run_queue_wait(pid: int) -> float:
    """Seconds the threads of process `pid` have waited for a core so far."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as stat:
                total += int(stat.read().split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total / 1e9


async def measure(corpus: str, gets: int, idle: bool) -> dict[str, Any]:
    node = await started_node("get-stages")
    ctx = multiprocessing.get_context("spawn")
    stop, bulk_ready, moved = ctx.Event(), ctx.Event(), ctx.Queue()
    bulk = None
    if not idle:
        args = (node.target, corpus, 1024, 4, 32768, bulk_ready, stop, moved)
        bulk = ctx.Process(target=latency._bulk_client, args=args, name="bulk")
        bulk.start()
        await asyncio.to_thread(bulk_ready.wait)
    ready, go, times = ctx.Event(), ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=_probe, args=(node.target, corpus, gets, ready, go, times))
    probe.start()
    try:
        await asyncio.to_thread(ready.wait)
        for stamps in (SERVED, ENDED):
            stamps.clear()
        pids = {"node": os.getpid(), "probe": probe.pid or 0}
        waited = {name: _run_queue_wait(pid) for name, pid in pids.items()}
        go.set()
        got = await asyncio.to_thread(times.get, True, 600)
        waited = {name: _run_queue_wait(pid) - waited[name] for name, pid in pids.items()}
    finally:
        stop.set()
        bulk_rate = (await asyncio.to_thread(moved.get, True, 600))["pages_per_s"] if bulk else 0
        if bulk:
            bulk.join()
        probe.join()
        await node.stop(grace=1)
    if not len(SERVED) == len(got):
        raise SystemExit(f"{len(got)} gets, {len(SERVED)} served")
    stages = {
        "total": [end - start for start, end in got],
        "to_handler": [s - start for s, (start, _) in zip(SERVED, got, strict=True)],
        "reply": [end - e for e, (_, end) in zip(ENDED, got, strict=True)],
    }
    out: dict[str, Any] = {"gets": len(got), "bulk_pages_per_s": round(bulk_rate)}
    for stage, values in stages.items():
        values.sort()
        for q in (0.5, 0.9, 0.99):
            at = values[min(len(values) - 1, int(q * len(values)))]
            out[f"{stage}_p{round(q * 100)}_ms"] = round(at * 1000, 3)
    for name, seconds in waited.items():
        out[f"{name}_core_wait_per_get_ms"] = round(seconds / len(got) * 1000, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="A single get's stages under bulk load.")
    parser.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    parser.add_argument("--gets", type=int, default=2000, help="gets to time")
    parser.add_argument("--idle", action="store_true", help="without the bulk client")
    args = parser.parse_args()
    _wrap_node()
    print(json.dumps(asyncio.run(measure(args.corpus, args.gets, args.idle))))


if __name__ == "__main__":
    main()
