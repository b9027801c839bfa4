# The node commands of `ramster` end to end, as a user runs them: subprocesses against a node
# subprocess, checking output, files and exit status.
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ramster.client.local import LocalNode
from tests.conftest import DATA


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    raw: bytes  # stdout as bytes, for commands that write page data


def ramster(*args: str) -> Run:
    out = subprocess.run(
        [sys.executable, "-m", "ramster.cli.main", *args], capture_output=True, timeout=300
    )
    stderr = out.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    return Run(out.returncode, out.stdout.decode(errors="replace"), stderr, out.stdout)


@pytest.fixture(scope="module")
def node() -> Iterator[LocalNode]:
    with LocalNode("--pool-limit", "256Mi") as n:
        yield n


def test_put_get_flush_a_file(node: LocalNode, tmp_path: Path, sample_pages: list[bytes]) -> None:
    t = ("--target", node.target)
    pool = ramster("pools", *t, "create").stdout.strip()
    data = b"".join(sample_pages[:3]) + b"tail bytes"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    put = ramster("put", *t, "--pool", pool, "--oid", "7", str(src))
    assert put.returncode == 0, put.stderr
    assert f"put {len(data)} bytes as 4 pages" in put.stdout and f"length {len(data)}" in put.stdout
    dst = tmp_path / "out.bin"
    get = ramster(
        "get",
        *t,
        "--pool",
        pool,
        "--oid",
        "7",
        "--pages",
        "4",
        "--length",
        str(len(data)),
        str(dst),
    )
    assert get.returncode == 0, get.stderr
    assert dst.read_bytes() == data
    padded = ramster("get", *t, "--pool", pool, "--oid", "7", "--pages", "4", "-")
    assert padded.raw == data + bytes(4 * 4096 - len(data))
    one = ramster("flush", *t, "--pool", pool, "--oid", "7", "--index", "3")
    assert one.returncode == 0 and "flushed page 3" in one.stdout
    rest = ramster("flush", *t, "--pool", pool, "--oid", "7")
    assert rest.returncode == 0 and "flushed 3 pages" in rest.stdout
    gone = ramster("get", *t, "--pool", pool, "--oid", "7", "--pages", "1", str(dst))
    assert (
        gone.returncode == 2
        and "cannot be read" in gone.stderr
        and "(miss: the node has no such page)" in gone.stderr
    )


def test_put_reports_refused_pages(
    node: LocalNode, tmp_path: Path, sample_pages: list[bytes]
) -> None:
    t = ("--target", node.target)
    pool = ramster("pools", *t, "create").stdout.strip()
    src = tmp_path / "xz.bin"
    src.write_bytes(b"".join(sample_pages[88:90]))  # incompressible
    put = ramster("put", *t, "--pool", pool, "--oid", "1", str(src))
    assert put.returncode == 1 and "refused 2 pages (poor_compression 2)" in put.stderr


def test_pools_stats_health(node: LocalNode) -> None:
    t = ("--target", node.target)
    pool = ramster("pools", "create", *t, "--kind", "ephemeral", "--allocator", "zbud")
    assert pool.returncode == 0 and pool.stdout.strip().isdigit()
    listing = ramster("pools", *t)
    assert listing.returncode == 0
    assert any(line.split()[:3] == [pool.stdout.strip(), "ephemeral", "zbud"]
               for line in listing.stdout.splitlines())  # fmt: skip
    stats = ramster("stats", *t)
    assert (
        stats.returncode == 0
        and "stored pages" in stats.stdout
        and "pool limit bytes" in stats.stdout
    )
    destroyed = ramster("pools", *t, "destroy", pool.stdout.strip())
    assert destroyed.returncode == 0 and "destroyed pool" in destroyed.stdout
    missing = ramster("pools", *t, "destroy", "999")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    health = ramster("health", *t)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"


def test_unreachable_target_and_bad_args() -> None:
    health = ramster("health", "--target", "127.0.0.1:1", "--timeout", "5")
    assert health.returncode == 1 and health.stdout.startswith("UNREACHABLE")
    assert len(health.stdout.strip().splitlines()) == 1
    stats = ramster("stats", "--target", "127.0.0.1:1")
    assert stats.returncode == 2 and "127.0.0.1:1: UNAVAILABLE" in stats.stderr
    bad = ramster("stats", "--target", "nohost")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    missing = ramster("put", "--pool", "0", "--oid", "1", "/nonexistent/file")
    assert missing.returncode == 2 and "cannot read /nonexistent/file" in missing.stderr
    wide = ramster("flush", "--pool", "0", "--oid", "1", "--index", str(2**32 + 5))
    assert wide.returncode == 2 and f"expected a page index in [0, 2**32), got {2**32 + 5}" in (
        wide.stderr
    )
    wide = ramster("pools", "destroy", str(2**64))
    assert wide.returncode == 2 and "expected a pool id in [0, 2**64)" in wide.stderr
    across = ramster("get", "--target", "127.0.0.1:1", "--pool", "0", "--oid", "1",
                     "--start", str(2**32 - 1), "--pages", "2", "-")  # fmt: skip
    assert across.returncode == 2 and f"indexes holds {2**32}" in across.stderr


def test_health_of_a_stopping_node() -> None:
    with LocalNode("--grace", "30") as stopping:
        assert ramster("health", "--target", stopping.target).returncode == 0
        assert stopping.stop() == 0
        out = ramster("health", "--target", stopping.target, "--timeout", "5")
        assert out.returncode == 1


def test_bench_node_json(node: LocalNode) -> None:
    out = ramster(
        "bench", "node", "--target", node.target, "--corpus", str(DATA / "sample.pages"),
        "--pages", "3000", "--batch", "256", "--singles", "50", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for field in ("put_pages_per_s", "get_pages_per_s", "get_p50_ms", "get_p99_ms",
                  "single_get_p50_ms", "put_mb_per_s", "put_p99_ms"):  # fmt: skip
        assert result[field] > 0, field
    assert result["verified"] is True and result["pages"] == 3000
    assert result["refused"]["poor_compression"] > 0


def test_bench_node_starts_its_own_node() -> None:
    out = ramster("bench", "node", "--corpus", str(DATA / "sample.pages"), "--singles", "10")
    assert out.returncode == 0, out.stderr
    assert "single_get_p50_ms" in out.stdout and "True" in out.stdout


def test_help_explains_commands() -> None:
    for command in ("put", "get", "flush", "pools", "stats", "health"):
        out = ramster(command, "--help")
        assert out.returncode == 0 and "--target" in out.stdout
    assert "--corpus" in ramster("bench", "node", "--help").stdout


def test_after_a_crash_get_says_lost_and_pools_accept_loss_clears_it(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(sample_pages[0])
    with LocalNode(data_dir=tmp_path / "data") as node:
        t = ("--target", node.target)
        pool = ramster("pools", *t, "create").stdout.strip()
        assert ramster("put", *t, "--pool", pool, "--oid", "7", str(src)).returncode == 0
        node.kill()  # the page was in RAM alone
        node.start()
        t = ("--target", node.target)
        get = ("get", *t, "--pool", pool, "--oid", "7", "--pages", "1", str(tmp_path / "o"))
        lost = ramster(*get)
        assert lost.returncode == 2 and "(lost: the node crashed" in lost.stderr
        listing = ramster("pools", *t)
        assert [pool, "persistent"] == listing.stdout.splitlines()[-2].split()[:2]
        assert "LOST" in listing.stdout.splitlines()[-2] and "accept-loss" in listing.stdout
        accepted = ramster("pools", *t, "accept-loss", pool)
        assert accepted.returncode == 0 and "losses accepted" in accepted.stdout
        again = ramster("pools", *t, "accept-loss", pool)
        assert "not marked lost" in again.stdout
        assert "(miss: the node has no such page)" in ramster(*get).stderr
        assert "LOST" not in ramster("pools", *t).stdout
