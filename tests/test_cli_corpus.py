# `ramster corpus snapshot` on a live process of this test: the corpus it writes loads, holds
# real pages of that process (the marker the child keeps in its heap is among them), and the
# benchmarks take it; a process that does not exist is a one-line error.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ramster.bench.corpus import load_corpus
from tests.conftest import ramster

CHILD = """
import sys
marker = (b"ramster-snapshot-marker-" * 200)[:4096] * 64   # 64 pages of the heap say who it is
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def test_snapshot_of_a_live_process(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        out = tmp_path / "child.pages"
        made = ramster("corpus", "snapshot", str(child.pid), str(out), "--max-pages", "100000")
        assert made.returncode == 0, made.stderr
        assert f"of process {child.pid}" in made.stdout and "LZ4 mean" in made.stdout
    finally:
        child.communicate(b"", timeout=30)
    pages = load_corpus(out)
    assert sum(b"ramster-snapshot-marker-" in page for page in pages) >= 32
    bench = ramster("bench", "engine", "--corpus", str(out), "--allocator", "zbud", "--json")
    assert bench.returncode == 0, bench.stderr
    gone = ramster("corpus", "snapshot", str(child.pid), str(tmp_path / "x.pages"))
    assert gone.returncode == 2 and f"no process {child.pid}" in gone.stderr
    assert not (tmp_path / "x.pages").exists()
