# Membership at runtime with real node processes on loopback (issue 11): a running 3-node
# cluster grows to 5 with nodes that know one seed (one of them by another name, an alias of a
# member), then shrinks to 4 by a SIGTERM (the node leaves for good), all under a stream of
# puts and verified reads through node 1.  The newcomers hold copies, the one that left is
# drained and forgotten by every member, nobody counts a member twice, and no page is lost; in
# plain text and with mTLS between peers (newcomers show certificates of the same CA).
from __future__ import annotations

import signal
import threading
import time

import pytest

from ramster.client import PageStatus
from ramster.client.cluster import LocalCluster
from ramster.client.errors import RamsterError
from ramster.client.local import LocalNode
from tests.cluster.probes import distinct_pages, gauge, wait_for, wait_replicated

FAST = ["--heartbeat-interval", "0.25", "--down-after", "3", "--peer-timeout", "1"]
PAGES = 10_000
BATCH = 128


def members(node: LocalNode) -> tuple[int, int]:
    with node.client(timeout=10) as client:
        stats = client.stats()
    return stats.peers, stats.peers_up


def _four(seen: tuple[int, int]) -> bool:
    return seen == (3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_grow_three_to_five_then_shrink_to_four_under_traffic(
    compressible_pages: list[bytes], tls: bool
) -> None:
    pages = distinct_pages(compressible_pages, 7, PAGES)
    limit = [["--pool-limit", "4Mi"]]
    with LocalCluster(3, common=FAST, per_node=limit, tls=tls) as cluster:
        owner = cluster.nodes[0]
        with owner.client(timeout=60) as client:
            pool = client.create_pool()
        acked = 0
        errors: list[str] = []
        done = threading.Event()

        def traffic() -> None:
            """Puts through node 1, each batch read back at once; bounded in count and time."""
            nonlocal acked
            with owner.client(timeout=30) as c:
                deadline = time.monotonic() + 240
                while not done.is_set() and acked < PAGES and time.monotonic() < deadline:
                    batch = pages[acked : acked + BATCH]
                    try:
                        c.put_many(pool, 7, acked, batch)
                        got = c.get_many(pool, 7, acked, len(batch))
                    except RamsterError as exc:
                        errors.append(str(exc))
                        return
                    if got.pages != batch:
                        errors.append(f"batch at {acked} came back wrong")
                        return
                    acked += len(batch)
                    time.sleep(0.1)  # a steady stream, not a burst done before the growth

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            wait_for("traffic to spill", lambda: acked, lambda n: n >= PAGES // 4, 120)
            started = time.monotonic()
            # node4 knows only node2; node5 only node3, by another name (an alias of a member)
            new = cluster.grow(1, seed=1) + cluster.grow(1, seed=2, host="localhost")
            cluster.wait_peers(60)
            print(f"\ngrew to 5 in {time.monotonic() - started:.1f}s")
            for node in cluster.nodes:
                assert members(node) == (4, 4), f"{node.target} sees {members(node)}"
            wait_for(
                "the newcomers to hold copies",
                lambda: [gauge(n, "ramster_foreign_pages") for n in new],
                lambda held: all(h > 0 for h in held),
                60,
            )
            assert acked < PAGES, "the traffic ended before the newcomers were used"

            leaver = cluster.nodes[2]  # node3, one of the original seeds
            started = time.monotonic()
            leaver.send_signal(signal.SIGTERM)
            assert leaver.process is not None
            leaver.process.wait(60)
            rest = [n for n in cluster.nodes if n is not leaver]
            for node in rest:
                wait_for(f"{node.target} to forget node3", lambda n=node: members(n), _four, 30)
            print(f"shrank to 4 in {time.monotonic() - started:.1f}s")
        finally:
            done_at = time.monotonic() + 120
            while thread.is_alive() and acked < PAGES and time.monotonic() < done_at:
                thread.join(1)
            done.set()
            thread.join()
        assert not errors, errors
        assert acked == PAGES
        wait_replicated(owner, 60)
        with owner.client(timeout=60) as client:
            got = client.get_many(pool, 7, 0, PAGES)
            bad = [i for i, s in enumerate(got.statuses) if s is not PageStatus.HIT]
            assert not bad, f"{len(bad)} pages not served, first {bad[:3]}"
            assert got.pages == pages
            assert client.stats().remote_lost_pages == 0


def test_a_node_that_holds_nothing_is_forgotten_at_once_when_it_leaves() -> None:
    """Its stop waits until the members have heard it is leaving, so they forget it when it is
    gone rather than after --forget-after (60 s), as they would a node that may come back."""
    with LocalCluster(2, common=FAST) as cluster:
        stayer, leaver = cluster.nodes
        assert members(stayer) == (1, 1)
        leaver.send_signal(signal.SIGTERM)
        assert leaver.process is not None
        leaver.process.wait(30)
        wait_for("node1 to forget node2", lambda: members(stayer), lambda m: m == (0, 0), 15)
