# Heap trimming on real node processes: after a burst of evictions to peers, the owner and both
# holders give their freed heap back to the OS once the traffic pauses (node/heap.py).  How much
# RSS that saves is a benchmark number (`ramster bench cluster`: owner_bytes_per_remote_page),
# not asserted here.
from __future__ import annotations

import pytest

from node.heap import TRIM_AFTER
from ramster.client.cluster import LocalCluster
from tests.cluster.probes import distinct_pages, gauge, wait_for
from tests.cluster.test_reliability import FAST, spill

TRIMS = "ramster_heap_trims_total"


@pytest.mark.slow
def test_owner_and_holders_trim_their_heaps_after_a_spill(compressible_pages: list[bytes]) -> None:
    pages = distinct_pages(compressible_pages, 7, TRIM_AFTER * 3 // 2)
    with LocalCluster(3, common=FAST, per_node=[["--pool-limit", "4Mi"]]) as cluster:
        owner = cluster.nodes[0]
        with owner.client(timeout=60) as client:
            spill(client, client.create_pool(), pages)
        moved = gauge(owner, "ramster_remote_puts_total")
        assert moved >= TRIM_AFTER
        for node in cluster.nodes:
            wait_for(f"{node.target} to trim its heap", lambda n=node: gauge(n, TRIMS), bool, 30)
