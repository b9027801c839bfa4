# What the cluster tests look at and wait for: metrics of a node, distinct real pages, and a wait
# that fails loudly (naming what it waited for and what it saw last) instead of returning quietly.
from __future__ import annotations

import struct
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from ramster.client.local import LocalNode

T = TypeVar("T")


def metric(node: LocalNode, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric family from a node's /metrics, by their labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics").read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def gauge(node: LocalNode, name: str) -> float:
    return sum(metric(node, name).values())


def replica_counts(node: LocalNode) -> dict[int, float]:
    """Remote pages of a node by their number of live copies (peers plus disk)."""
    return {
        int(dict(labels)["copies"]): value
        for labels, value in metric(node, "ramster_remote_replicas_pages").items()
    }


def wait_replicated(node: LocalNode, timeout: float = 60, copies: int = 2) -> None:
    """Until every remote page of `node` has `copies` live copies (fails showing the counts)."""
    wait_for(
        f"every remote page of {node.target} to have {copies} copies",
        lambda: replica_counts(node),
        lambda counts: all(n >= copies for n, pages in counts.items() if pages),
        timeout,
    )


def distinct_pages(base: list[bytes], oid: int, count: int, start: int = 0) -> list[bytes]:
    """Real pages, each stamped with its own key, so a page served under another key is caught."""
    return [
        struct.pack("<QQ", oid, i) + base[i % len(base)][16:] for i in range(start, start + count)
    ]


def wait_for(what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout: float) -> T:
    """Poll `probe` until `ok(value)`; fail with the last value seen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last {value!r}")
        time.sleep(0.1)
