# The event-loop stall meter and its metrics: a loop held busy is measured for at least as long as
# it was held (and logged), the worst-stall gauge forgets a stall two windows old, and a running
# node exports both families.
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import node.metrics
from node.loopwatch import LoopWatch
from node.metrics import STALL_WINDOW, LoopStallMetrics
from node.server import Node
from tests.node.test_metrics import scrape, value

HELD = 0.02


async def test_a_held_loop_is_measured_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    posted = threading.Event()
    post = loop.call_soon_threadsafe

    def post_and_tell(*args: Any) -> asyncio.Handle:
        handle = post(*args)
        posted.set()
        return handle

    monkeypatch.setattr(loop, "call_soon_threadsafe", post_and_tell)
    stalls: list[float] = []
    watch = LoopWatch(stalls.append, interval=0.001, report_after=HELD / 2)
    with caplog.at_level(logging.WARNING):
        watch.start()
        assert posted.wait(30)  # the loop is held from the moment a probe waits for it...
        time.sleep(HELD)  # ...for HELD seconds more
        while not stalls:
            await asyncio.sleep(0)
        await watch.stop()
    assert stalls[0] >= HELD
    assert watch.max_stall >= HELD
    assert "loop_stall" in caplog.text


def test_the_worst_stall_gauge_forgets_old_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(node.metrics.time, "monotonic", lambda: clock[0])
    registry = CollectorRegistry()
    stalls = LoopStallMetrics(registry)

    def worst() -> float | None:
        return registry.get_sample_value("ramster_event_loop_stall_max_seconds")

    stalls.observe(0.2)
    assert worst() == 0.2
    clock[0] += STALL_WINDOW
    stalls.observe(0.001)
    assert worst() == 0.2  # one window ago: still shown
    clock[0] += STALL_WINDOW
    stalls.observe(0.003)
    assert worst() == 0.003  # two windows ago: forgotten
    assert registry.get_sample_value("ramster_event_loop_lag_seconds_count") == 3
    assert registry.get_sample_value("ramster_event_loop_lag_seconds_bucket", {"le": "0.1"}) == 2


async def test_a_node_exports_its_stalls(node: Node) -> None:
    text = await scrape(node)
    while not value(text, "ramster_event_loop_lag_seconds_count"):
        await asyncio.sleep(0.01)
        text = await scrape(node)
    assert value(text, "ramster_event_loop_stall_max_seconds") > 0
