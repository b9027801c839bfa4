# The README's main job end to end: `ramster demo --once` starts a cluster, overflows node 1 into
# its peers, verifies every page and stops; `ramster bench cluster` prints its numbers.
from __future__ import annotations

import json

import pytest

from tests.conftest import DATA, ramster


@pytest.mark.slow
def test_demo_spills_to_peers_and_verifies() -> None:
    out = ramster("demo", "--once", "--pages", "6000", "--pool-limit", "4Mi", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["verified"] is True and result["lost"] == 0
    node1, *peers = result["nodes"]
    assert node1["pages_remote"] > 1000
    assert all(p["held_for_peers"] == node1["pages_remote"] for p in peers)  # two replicas


@pytest.mark.slow
def test_bench_cluster_reports_local_and_remote_hits() -> None:
    out = ramster(
        "bench",
        "cluster",
        "--corpus",
        str(DATA / "sample.pages"),
        "--pages",
        "5000",
        "--pool-limit",
        "4Mi",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    for key in ("local_get_pages_per_s", "remote_get_pages_per_s", "remote_get_p99_ms"):
        assert result[key] > 0
    assert result["verified"] is True


def test_demo_rejects_a_bad_corpus(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = ramster("demo", "--once", "--corpus", str(tmp_path / "missing.pages"))
    assert out.returncode == 2 and "cannot read corpus" in out.stderr
