# Metrics scrapes on the HTTP thread while the event loop changes the engine: every scrape is one
# consistent state (puts = sum of outcomes, a whole number of chunks filed, pages per frame of
# those pages and frames), counters never go back, nothing raises; and a stalled loop gets the
# last value served instead of a hung or failed scrape.
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from node.engine import CHUNK_PAGES, ChunkedEngine
from node.metrics import LoopCollector, NodeMetrics, engine_families
from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig

BATCHES = 12
BATCH = 256  # pages per put batch: 32 chunks, each a turn of the loop


Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def values_of(families: Iterable[Metric]) -> Values:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def values(text: str) -> Values:
    return values_of(text_string_to_metric_families(text))


async def wait_until(what: str, ok: Callable[[], bool], timeout: float = 30.0) -> None:
    """Let the loop run until `ok()`; fail loudly after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


def check_consistent(v: Values) -> None:
    puts = v[("ramster_puts_total", ())]
    outcomes = sum(n for (name, _), n in v.items() if name == "ramster_put_outcomes_total")
    assert puts == outcomes
    assert puts % CHUNK_PAGES == 0  # a chunk is filed in one turn of the loop: never half seen
    frames = v[("ramster_pool_size_bytes", ())] / PAGE_SIZE
    zpages = v[("ramster_zpages", ())]
    assert frames <= v[("ramster_pool_limit_bytes", ())] / PAGE_SIZE
    assert zpages <= v[("ramster_stored_pages", ())]
    assert v[("ramster_pages_per_frame", ())] == (zpages / frames if frames else 0.0)


async def test_scrapes_during_bulk_puts_are_consistent(sample_pages: list[bytes]) -> None:
    # an ephemeral pool smaller than what is put: the reaper evicts while puts run
    engine = ZCache(ZCacheConfig(pool_limit_frames=600))
    pool = engine.create_pool(PoolKind.EPHEMERAL)
    metrics = NodeMetrics(engine.snapshot, "test", "test-node")
    chunked = ChunkedEngine(engine)
    scrapes: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def scrape_until_done() -> None:
        try:
            while not done.is_set():
                scrapes.append(generate_latest(metrics.registry).decode())
        except BaseException as exc:
            failures.append(exc)

    def scraped_since(seen: int) -> bool:
        return len(scrapes) > seen or bool(failures)

    scraper = threading.Thread(target=scrape_until_done)
    scraper.start()
    try:
        for b in range(BATCHES):
            keys = [(b, i) for i in range(BATCH)]
            pages = [sample_pages[(b + i) % len(sample_pages)] for i in range(BATCH)]
            await chunked.put_batch(pool, keys, pages)
            await wait_until("a scrape after the batch", partial(scraped_since, len(scrapes)))
    finally:
        done.set()
        await asyncio.to_thread(scraper.join)
    assert not failures
    puts = [values(text)[("ramster_puts_total", ())] for text in scrapes]
    assert puts == sorted(puts)  # counters never go back
    assert len(set(puts)) > BATCHES // 2  # scrapes landed all along the run
    assert engine.snapshot().reclaim_passes > 0  # the reaper ran while they did
    for text in scrapes:
        check_consistent(values(text))


async def test_a_stalled_loop_gets_the_last_value_served(sample_pages: list[bytes]) -> None:
    engine = ZCache(ZCacheConfig(pool_limit_frames=64))
    pool = engine.create_pool(PoolKind.PERSISTENT)
    collector = LoopCollector(asyncio.get_running_loop(), timeout=0.2)
    collector.add(engine.snapshot, engine_families)
    first = await asyncio.to_thread(lambda: values_of(collector.collect()))
    engine.put_batch(pool, [(0, i) for i in range(8)], sample_pages[:8])
    scraped = threading.Event()
    during: list[Values] = []

    def scrape() -> None:
        during.append(values_of(collector.collect()))
        scraped.set()

    thread = threading.Thread(target=scrape)
    thread.start()
    assert scraped.wait(timeout=30)  # the loop is blocked here while the scrape times out
    thread.join()
    assert during == [first]  # the value read before the stall, not the puts made since
    after = await asyncio.to_thread(lambda: values_of(collector.collect()))
    assert after[("ramster_puts_total", ())] == 8
