# A node's Prometheus page, read by the benchmarks that start or are given a node: its loop-lag
# histogram (`bench latency`) and its threads' CPU time by role (`bench latency`, `bench nbd`).
# One scrape is one HTTP GET on the node's metrics port and a parse by prometheus_client; a
# benchmark reads it around a timed phase, never inside one.
from __future__ import annotations

import urllib.request

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

THREAD_CPU = "ramster_thread_cpu_seconds"  # node/threadcpu.py's family (samples end in _total)


def families(where: str) -> list[Metric]:
    """The metric families the node whose metrics listen at HOST:PORT `where` serves now."""
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=30) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def thread_cpu(scraped: list[Metric]) -> dict[str, float]:
    """CPU seconds of the node's threads so far, by role, from one scrape."""
    return {s.labels["role"]: s.value for f in scraped if f.name == THREAD_CPU for s in f.samples}
