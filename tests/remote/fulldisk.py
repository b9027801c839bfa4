# A full disk as the remote journal sees it: the os module, but write() takes only `room` more
# bytes (a partial write, the way a filling disk cuts one short) and then fails with ENOSPC, as
# does creating a file once there is no room.  Tests put it in place of the `os` of
# ramster.remote.journal (its appends) or ramster.atomicfile (its rewrites), so nothing else sees
# the disk full.
from __future__ import annotations

import errno
import os


class FullDiskOs:
    def __init__(self, room: int = 0) -> None:
        self.room = room

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes | bytearray) -> int:
        if not self.room:
            raise no_space()
        taken = min(self.room, len(data))
        self.room -= taken
        return os.write(fd, bytes(data[:taken]))

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT and not self.room:
            raise no_space()
        return os.open(path, flags, mode)


def no_space() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")
