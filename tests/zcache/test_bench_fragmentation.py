# `ramster bench fragmentation` as a user runs it, on tiny sizes: it runs, and reports frames
# around compaction against perfect packing and evictions with compaction on and off.  (Its
# goals are the benchmark's to show on real sizes, not this test's.)
from __future__ import annotations

import json

import pytest

from tests.conftest import DATA, ramster


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud"])
def test_bench_fragmentation_reports_its_numbers(allocator: str) -> None:
    out = ramster(
        "bench", "fragmentation", "--corpus", str(DATA / "sample.pages"), "--pages", "600",
        "--allocator", allocator, "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["allocator"] == allocator and report["pages"] == 600
    before, after = report["frames_before_compaction"], report["frames_after_compaction"]
    assert report["perfect_frames"] <= after <= before
    assert report["compaction_freed_frames"] == before - after
    assert 0 <= report["repack_share"] <= 1
    for field in ("churn_evicted_compaction_on", "churn_evicted_compaction_off"):
        assert report[field] >= 0
    assert report["churn_limit_frames"] > 0


def test_bench_fragmentation_table() -> None:
    corpus = str(DATA / "sample.pages")
    out = ramster("bench", "fragmentation", "--corpus", corpus, "--pages", "300")
    assert out.returncode == 0, out.stderr
    assert "repack_share" in out.stdout and "churn_evicted_compaction_off" in out.stdout
