# The Prometheus endpoint: values that follow what clients do, go-grpc-prometheus names, and a
# clean bill from promtool (installed by .ci/run; skipped where it is missing).
from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.server import Node
from ramster.client import AsyncClient, KeyRange, NotFound


async def scrape(node: Node) -> str:
    """The node's metrics, fetched from another thread: the node's loop (the test's) must be
    free to answer the scrape."""
    return await asyncio.to_thread(fetch_metrics, node)


def fetch_metrics(node: Node) -> str:
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return str(reply.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def test_engine_metrics_follow_puts_and_gets(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    before = await scrape(node)
    assert value(before, "ramster_stored_pages") == 0
    assert value(before, "ramster_pool_limit_bytes") == 64 * 1024 * 1024
    pool = await client.create_pool()
    await client.put_batch(pool, KeyRange(1, 0, 96), sample_pages)
    await client.get_batch(pool, KeyRange(1, 0, 100))
    after = await scrape(node)
    assert value(after, "ramster_stored_pages") == 88
    assert value(after, "ramster_puts_total") == 96
    assert value(after, "ramster_puts_refused_total", reason="poor_compression") == 8
    assert value(after, "ramster_puts_refused_total", reason="no_room") == 0
    assert value(after, "ramster_put_outcomes_total", outcome="stored") == 88
    assert value(after, "ramster_gets_total", result="hit") == 88
    assert value(after, "ramster_gets_total", result="miss") == 12
    assert value(after, "ramster_pool_size_bytes") > 0
    assert value(after, "ramster_pages_per_frame") > 1
    assert value(after, "ramster_pools") == 1
    await client.flush_object(pool, 1)
    assert value(await scrape(node), "ramster_flushes_total") == 88
    info = [s for s in samples(after) if s[0] == "ramster_build_info"]
    assert info and ("version", "0.1.0") in info[0][1]


async def test_grpc_metrics(node: Node, client: AsyncClient) -> None:
    await client.create_pool()
    with pytest.raises(NotFound):
        await client.destroy_pool(99)
    text = await scrape(node)
    unary = {"grpc_type": "unary", "grpc_service": "ramster.v1.Tmem"}
    assert value(text, "grpc_server_started_total", grpc_method="CreatePool", **unary) == 1
    assert (
        value(text, "grpc_server_handled_total", grpc_method="CreatePool", grpc_code="OK", **unary)
        == 1
    )
    assert (
        value(
            text,
            "grpc_server_handled_total",
            grpc_method="DestroyPool",
            grpc_code="NotFound",
            **unary,
        )
        == 1
    )
    assert value(text, "grpc_server_handling_seconds_count", grpc_method="CreatePool", **unary) == 1


async def test_requests_on_stream_and_pages_calls_are_counted_each(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    """gRPC's metrics count a Stream or Pages call once; each request on it is counted (by
    operation and code) and timed on its own."""
    pool = await client.create_pool()
    await client.put(pool, 1, 0, sample_pages[0])  # single-page calls go over Pages
    assert await client.get(pool, 1, 0) == sample_pages[0]
    assert await client.get(pool, 1, 1) is None
    with pytest.raises(NotFound):
        await client.get(pool + 99, 1, 0)
    async with client.stream() as stream:
        got = await (await stream.get_batch(pool, KeyRange(1, 0, 4)))
    assert got.pages[0] == sample_pages[0]
    text = await scrape(node)
    counted = "ramster_stream_requests_total"
    assert value(text, counted, grpc_method="Pages", op="put", grpc_code="OK") == 1
    assert value(text, counted, grpc_method="Pages", op="get", grpc_code="OK") == 2
    assert value(text, counted, grpc_method="Pages", op="get", grpc_code="NotFound") == 1
    assert value(text, counted, grpc_method="Stream", op="get", grpc_code="OK") == 1
    timed = "ramster_stream_request_seconds_count"
    assert value(text, timed, grpc_method="Pages", op="get") == 3
    assert value(text, timed, grpc_method="Stream", op="get") == 1


async def test_promtool_accepts_the_metrics(
    node: Node, client: AsyncClient, sample_pages: list[bytes]
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    pool = await client.create_pool()
    await client.put_batch(pool, KeyRange(1, 0, 96), sample_pages)
    async with client.stream() as stream:
        await (await stream.get_batch(pool, KeyRange(1, 0, 96)))
    check = subprocess.run(
        [promtool, "check", "metrics"], input=await scrape(node), capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("amount", [0.0, 0.0004, 0.003, 1.0, 1e9])
def test_observe_many_leaves_what_that_many_observes_leave(amount: float) -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from node.metrics import LATENCY_BUCKETS, observe_many

    def histogram() -> tuple[CollectorRegistry, Histogram]:
        registry = CollectorRegistry()
        family = Histogram("t_seconds", "t", ["l"], buckets=LATENCY_BUCKETS, registry=registry)
        return registry, family.labels("x")

    one_by_one, many = histogram(), histogram()
    for _ in range(7):
        one_by_one[1].observe(amount)
    one_by_one[1].observe(0.002)
    observe_many(many[1], amount, 7)
    observe_many(many[1], 0.002, 1)
    observe_many(many[1], 0.5, 0)

    def counts(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        found = samples(generate_latest(registry).decode())
        return {k: v for k, v in found.items() if not k[0].endswith("_created")}

    want = counts(one_by_one[0])
    assert counts(many[0]) == want
    assert want[("t_seconds_count", frozenset({("l", "x")}))] == 8
