# Files replaced whole: written to a temporary file beside them, then renamed over the old one,
# so a reader, a crash or a full disk leaves the old file or the new one, never half of one.
#
# Every file the project rewrites goes through here (a node's pool log, remote journal and its
# peers file, sealing key, identity and port files; certificates; corpora).  They differ only in
# mode and in whether they must outlive a power cut: a durable file is fsync'd before the rename
# and its directory after it, so the rename is on disk too (without the second fsync a power cut
# can bring back the old file, or none, after the new one was acknowledged).  The temporary file
# is created afresh (one left by a crash is removed first, then O_EXCL with the mode asked), so a
# key is never readable by others, not even briefly.  On any error the temporary file goes (a
# partial copy would only take room on a disk that is full) and the OSError is raised, for the
# caller to word as its own (NO_SPACE tells a full disk or quota from the rest).
#
# Trade-off: two fsyncs per durable rewrite; every caller rewrites rarely (a pool created, a
# journal compacted, a node started), never per page.
from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

Data = bytes | bytearray | memoryview
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the errors of a write that finds no room


def replace_file(
    path: Path, data: Data | Iterable[Data], *, mode: int = 0o644, durable: bool = True
) -> int:
    """Replace `path` by `data` (bytes, or pieces written in turn: a piece may be reused once
    the next is asked for), created with `mode` (less the umask); the bytes written."""
    tmp = path.with_name(path.name + ".tmp")
    pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    written = 0
    try:
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            for piece in pieces:
                written += f.write(piece)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_directory(path.parent)
    return written


def sync_directory(path: Path) -> None:
    """fsync a directory, so the names created, renamed or removed in it are on disk (a
    filesystem that cannot sync a directory, as some network ones, keeps its own order)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
