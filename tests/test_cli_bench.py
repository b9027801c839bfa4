# `ramster bench engine` and `ramster bench latency` end to end, as a user runs them: a
# subprocess, its stdout and exit status.
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import DATA, ramster

FIELDS = {
    "pages",
    "same_filled",
    "refused",
    "stored",
    "frames",
    "pages_per_frame",
    "bound_pages_per_frame",
    "put_pages_per_s",
    "get_pages_per_s",
    "lz4_compress_pages_per_s",
    "lz4_decompress_pages_per_s",
    "metadata_bytes_per_page",
    "verified",
}


def test_bench_engine_json_cycles_the_corpus() -> None:
    out = ramster(
        "bench", "engine", "--corpus", str(DATA / "sample.pages"), "--pages", "500", "--json"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result.keys() >= FIELDS
    assert result["pages"] == 500
    assert result["verified"] is True
    assert result["refused"]["poor_compression"] > 0  # the xz pages of the sample
    assert result["stored"] + result["same_filled"] + sum(result["refused"].values()) == 500


def test_bench_engine_table() -> None:
    out = ramster("bench", "engine", "--corpus", str(DATA / "sample.pages"), "--allocator", "zbud")
    assert out.returncode == 0, out.stderr
    assert "pages_per_frame" in out.stdout and "verified" in out.stdout


def test_bench_engine_bad_corpus(tmp_path: Path) -> None:
    missing = ramster("bench", "engine", "--corpus", str(tmp_path / "nope.pages"))
    assert missing.returncode == 2
    assert "cannot read corpus" in missing.stderr and "Traceback" not in missing.stderr
    ragged = tmp_path / "ragged.pages"
    ragged.write_bytes(b"x" * 5000)
    out = ramster("bench", "engine", "--corpus", str(ragged))
    assert out.returncode == 2 and "multiple of 4096" in out.stderr


def test_bench_engine_bad_flags() -> None:
    out = ramster("bench", "engine", "--corpus", "x", "--pages", "0")
    assert out.returncode == 2 and "positive" in out.stderr
    out = ramster("bench", "engine", "--corpus", "x", "--allocator", "slab")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_latency_reports_what_the_node_saw() -> None:
    """A small run against a node it starts: every page verified, both phases timed, and the
    node's own view of each phase (its threads' cores by role; its loop busy under load)."""
    args = ("--singles", "300", "--pages", "2048", "--batch", "256", "--clients", "1")
    out = ramster("bench", "latency", "--corpus", str(DATA / "sample.pages"), *args, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["verified"] is True and result["singles"] == 300
    for phase in ("idle", "loaded"):
        assert 0 < result[f"{phase}_get_p50_ms"] <= result[f"{phase}_get_p99_ms"]
        assert set(result[f"{phase}_node_cores_by_thread"]) == {"loop", "codec", "grpc", "other"}
    assert result["loaded_node_cores_by_thread"]["loop"] > 0
    assert result["put_pages_per_s_1_clients"] > 0 and result["get_pages_per_s_1_clients"] > 0
