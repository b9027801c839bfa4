#!/usr/bin/env python3
# How long a node's event loop holds on to one step of work while a bulk client streams puts and
# gets into it, in CPU time: `python scripts/loop_steps.py --corpus FILE [--seconds 20]`.
#
# `ramster bench latency` times single gets by the wall clock, which on a shared machine mostly
# measures who else wants the cores.  This measures the cause the node controls: every callback
# step of the loop (a task step: an engine slice, a message parsed, a reply built) is timed with
# the thread's CPU clock, which does not run while the thread is preempted or waits for the GIL,
# so the distribution is the same on an idle and a crowded machine.  A small call can wait behind
# one such step of every batch running; the goal is that none is long.
#
# The node runs in this process (node.server.Node on port 0), the bulk client in another
# (ramster.bench.latency's, `--batch` pages per batch, 4 in flight), and the meter wraps asyncio's
# Handle._run for the run: a private method, which is why this is a script and not a node metric.
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from typing import Any

from inprocess import started_node

from ramster.bench import latency

STEPS: list[float] = []


def _metered(run: Any) -> Any:
    def timed(handle: asyncio.Handle) -> None:
        start = time.thread_time()
        run(handle)
        STEPS.append(time.thread_time() - start)

    return timed


async def measure(corpus: str, seconds: float, batch: int) -> dict[str, Any]:
    node = await started_node("loop-steps")
    ctx = multiprocessing.get_context("spawn")
    stop, ready, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    args = (node.target, corpus, batch, 4, 32768, ready, stop, queue)
    bulk = ctx.Process(target=latency._bulk_client, args=args, name="bulk")
    bulk.start()
    try:
        await asyncio.to_thread(ready.wait)
        STEPS.clear()
        cpu = time.thread_time()
        await asyncio.sleep(seconds)
        cpu = time.thread_time() - cpu
        steps = sorted(STEPS)
    finally:
        stop.set()
        moved = await asyncio.to_thread(queue.get, True, 600)
        bulk.join()
        await node.stop(grace=1)

    def ms(q: float) -> float:
        return round(steps[min(len(steps) - 1, int(q * len(steps)))] * 1000, 3)

    return {
        "steps": len(steps),
        "step_cpu_p50_ms": ms(0.5),
        "step_cpu_p99_ms": ms(0.99),
        "step_cpu_p999_ms": ms(0.999),
        "step_cpu_max_ms": round(steps[-1] * 1000, 3),
        "steps_over_1ms": sum(s > 0.001 for s in steps),
        "steps_over_2ms": sum(s > 0.002 for s in steps),
        "loop_cpu_seconds": round(cpu, 2),
        "bulk_pages_per_s": round(moved["pages_per_s"]),
        "verified": moved["bad"] == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Loop-step CPU of a node under bulk load.")
    parser.add_argument("--corpus", required=True, help="file of raw 4096-byte pages")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to measure")
    parser.add_argument("--batch", type=int, default=1024, help="pages per bulk batch")
    args = parser.parse_args()
    asyncio.events.Handle._run = _metered(asyncio.events.Handle._run)  # type: ignore[method-assign]
    print(json.dumps(asyncio.run(measure(args.corpus, args.seconds, args.batch))))


if __name__ == "__main__":
    main()
