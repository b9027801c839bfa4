# Files replaced whole (ramster/atomicfile.py): the new content or the old, never half; the mode
# asked even over a leftover temporary file; fsyncs of the file and of its directory when durable.
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramster import atomicfile
from ramster.atomicfile import replace_file
from tests.remote.fulldisk import FullDiskOs


def test_a_file_is_replaced_whole_from_pieces(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    piece = bytearray(b"ab")

    def pieces() -> Iterator[bytearray]:
        yield piece
        piece[:] = b"cd"  # reused once the next piece is asked for
        yield piece

    assert replace_file(path, pieces()) == 4
    assert path.read_bytes() == b"abcd" and not list(tmp_path.glob("*.tmp"))


def test_a_failure_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def failing() -> Iterator[bytes]:
        yield b"half"
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        replace_file(path, failing())
    assert path.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))


def test_no_room_for_the_copy_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomicfile, "os", FullDiskOs())
    with pytest.raises(OSError, match="No space"):
        replace_file(path, b"new")
    assert path.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))


def test_the_mode_holds_over_a_leftover_temporary_file(tmp_path: Path) -> None:
    path, leftover = tmp_path / "key", tmp_path / "key.tmp"
    leftover.write_bytes(b"a crash left this")
    leftover.chmod(0o666)
    replace_file(path, b"secret", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"secret"


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_file_and_its_directory_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_file(tmp_path / "f", b"x", durable=durable)
    assert synced == (["file", "dir"] if durable else [])


def test_a_directory_that_cannot_be_synced_is_left_to_its_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # as some network filesystems do
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_file(tmp_path / "f", b"x")
    assert (tmp_path / "f").read_bytes() == b"x"
