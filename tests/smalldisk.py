# Small real disks for full-disk tests: a tmpfs of a few MiB mounted for the test (root only),
# and a file that takes whatever room is left on one.
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs for the data directory")


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (needs root), unmounted after."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(path: Path) -> None:
    """Append zeros to the file at `path` until its filesystem has no room left."""
    with open(path, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(65536))
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(512))
