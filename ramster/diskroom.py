# Disk room set aside for a file that must be able to grow when its filesystem fills up.
#
# The remote journal (ramster/remote/journal.py) appends records whose loss loses the copies they
# tell of.  fallocate(2) with FALLOC_FL_KEEP_SIZE allocates blocks past the end of a file without
# moving the end: appends then land in blocks the filesystem has already given, so a full disk
# cannot refuse them, and a reader of the file sees only what was written.  Python's os module has
# posix_fallocate, which moves the end (the backing file uses it: its records are found by a
# scan, and it truncates what it did not use), but not this mode, so libc's fallocate is called
# through ctypes.  Where libc or the filesystem cannot do it (EOPNOTSUPP on some network
# filesystems) or the disk has no room, nothing is set aside and the caller goes on as before.
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 1  # linux/falloc.h

Fallocate = Callable[[int, int, int, int], int]


def _libc_fallocate() -> Fallocate | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_FALLOCATE = _libc_fallocate()


def keep_room(fd: int, offset: int, length: int) -> bool:
    """Allocate `length` bytes of the file `fd` from `offset` on, its size unchanged; whether
    the filesystem gave them."""
    return _FALLOCATE is not None and _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0
