# A bounded soak (issue 15): a minute of seeded overwrites, reads and flushes through a node whose
# small pool keeps pages moving to peers and back, judged against a model of every key.  Nothing
# fails here, so any wrong, lost or transient answer is a bug.
from __future__ import annotations

import pytest

from ramster.bench import soak
from ramster.bench.cluster import start_cluster


@pytest.mark.slow
def test_a_minute_of_churn_answers_every_get_right(sample_pages: list[bytes]) -> None:
    cluster = start_cluster(3, "8Mi")
    try:
        report = soak.run(sample_pages, seconds=50, keys=12_000, seed=15, cluster=cluster)
    finally:
        cluster.__exit__()
    assert report["batches"] > 300
    assert report["wrong"] == report["lost"] == report["transient"] == 0, report
    assert report["unavailable_counted_by_node"] == 0
