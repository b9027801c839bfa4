# A full disk as the remote journal sees it: the os module, but write() takes only `room` more
# bytes (a partial write, the way a filling disk cuts one short) and then fails with ENOSPC.
# Tests put it in place of ramster.remote.journal's `os`, so nothing else sees the disk full.
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
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = min(self.room, len(data))
        self.room -= taken
        return os.write(fd, bytes(data[:taken]))
