# A 3-node cluster on loopback with TLS everywhere, as `ramster demo` runs but with certificates:
# node 1's small pool spills to its peers over mTLS, and every page reads back through a TLS
# client; the peers hold the copies (so the peer listeners really served the owner's certificate).
from __future__ import annotations

from ramster.client import PageStatus
from ramster.client.cluster import LocalCluster
from tests.cluster.probes import wait_for

PAGES = 6000


def stamped(pages: list[bytes], n: int) -> list[bytes]:
    """n distinct compressible pages: real pages with their number in the first 8 bytes."""
    return [i.to_bytes(8, "little") + pages[i % len(pages)][8:] for i in range(n)]


def test_tls_cluster_spills_to_peers_and_reads_every_page_back(
    compressible_pages: list[bytes],
) -> None:
    pages = stamped(compressible_pages, PAGES)
    fast = ["--heartbeat-interval", "0.25", "--down-after", "5", "--peer-timeout", "2"]
    with LocalCluster(3, common=fast, per_node=[["--pool-limit", "2Mi"]], tls=True) as cluster:
        owner, *holders = cluster.nodes
        with owner.client(timeout=60) as client:
            pool = client.create_pool()
            outcomes = client.put_many(pool, 1, 0, pages)
            assert not [o for o in outcomes if o.refused]
            wait_for(
                "the outbox to drain", lambda: client.stats().remote_outbox, lambda n: n == 0, 60
            )
            stats = client.stats()
            assert stats.remote_pages > PAGES // 2, "the small pool must push pages to peers"
            held = 0
            for node in holders:
                with node.client() as peer:
                    held += peer.stats().foreign_pages
            assert held >= stats.remote_pages  # two replicas, over the mTLS peer listeners
            got = client.get_many(pool, 1, 0, PAGES)
            assert got.statuses == [PageStatus.HIT] * PAGES
            assert got.pages == pages
            assert client.stats().remote_lost_pages == 0
