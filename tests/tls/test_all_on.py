# Everything on at once (issue 10's end-to-end test): TLS to clients, mTLS between peers, bearer
# tokens with two tenants, and sealed remote pages (always on with peers).  Node 1's small pool
# spills to its peers, a holder is SIGKILLed, and every page still reads back through a TLS
# client with its tenant's token, while the other tenant cannot even see the pool.
from __future__ import annotations

from pathlib import Path

import pytest

from ramster.client import Client
from ramster.client.cluster import LocalCluster
from ramster.client.errors import NotFound
from tests.cluster.probes import distinct_pages, wait_for, wait_replicated
from tests.cluster.test_reliability import FAST, assert_all_back, spill

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


@pytest.mark.slow
def test_with_everything_on_a_killed_holder_loses_nothing(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    tokens = tmp_path / "tokens.toml"
    alice = f'[tenants.alice]\ntokens = ["{ALICE}"]\noperator = true\n'  # reads node-wide stats
    tokens.write_text(f'{alice}[tenants.bob]\ntokens = ["{BOB}"]\n')
    pages = distinct_pages(compressible_pages, 7, 6000)
    common = [*FAST, "--tokens", str(tokens)]
    with LocalCluster(
        3, common=common, per_node=[["--pool-limit", "2Mi"]], tls=True, token=ALICE
    ) as cluster:
        owner, _, doomed = cluster.nodes
        with owner.client(timeout=60) as alice:
            pool = alice.create_pool()
            spill(alice, pool, pages)
            assert alice.stats().remote_pages > len(pages) // 2
            doomed.kill()
            assert_all_back(alice, pool, pages)
            wait_for(
                "the holder to be marked down", lambda: alice.stats().peers_up, lambda n: n == 1, 20
            )
            wait_replicated(owner)
            assert_all_back(alice, pool, pages)
            assert alice.stats().remote_lost_pages == 0
        with Client(owner.target, timeout=30, tls_ca=owner.tls_ca, token=BOB) as bob:
            assert bob.list_pools() == []
            with pytest.raises(NotFound):
                bob.get_many(pool, 7, 0, 10)
