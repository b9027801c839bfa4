# Shared fixtures: real page samples shipped with the tests (tests/data), so every test runs
# from a fresh clone; CORPUS is where the larger shared corpora live when a machine has them.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ramster.bench.corpus import load_corpus

DATA = Path(__file__).parent / "data"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def sample_pages() -> list[bytes]:
    """96 real pages: 48 compiler heap, 40 Python heap, 8 incompressible (xz) pages last."""
    return load_corpus(DATA / "sample.pages")


@pytest.fixture(scope="session")
def compressible_pages(sample_pages: list[bytes]) -> list[bytes]:
    return sample_pages[:88]


@pytest.fixture(scope="session")
def incompressible_pages(sample_pages: list[bytes]) -> list[bytes]:
    return sample_pages[88:]


def ramster(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `ramster` command as a user would: a subprocess, its output and exit status."""
    return subprocess.run(
        [sys.executable, "-m", "ramster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
