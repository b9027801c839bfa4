# The NBD listener's Unix socket (--nbd-listen unix:PATH): for clients on the node's own host
# (qemu, nbd-client, nbdcopy), which reach it without TCP and without a port any local user can
# connect to.
#
# A loopback TCP port is open to every process of the host, so without TLS any local user could
# read and overwrite every export.  The socket file is made mode 0600 instead: only the node's
# user (and root) may connect; or, with --nbd-socket-group, 0660 and owned by that group (qemu
# often runs as a user of its own).  Mode and group are set between bind() and listen(), so no
# connection is ever accepted under the umask's mode (a connect() before listen() is refused).
#
# A socket file left at PATH by a node that died is replaced; one that a live server answers on
# is not (the node fails to start, as a TCP port in use would make it), and neither is anything
# that is not a socket.  On stop, the file is removed if it is still the one bound here.
from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

MODE = 0o600  # the node's user only ...
GROUP_MODE = 0o660  # ... and a group's members (--nbd-socket-group)
BACKLOG = 100  # asyncio's default
PROBE_SECONDS = 2.0  # for a server found at the path to take a probe's connection


def bind_unix(path: Path, group: int | None = None) -> tuple[socket.socket, int]:
    """A listening Unix stream socket at `path`, mode MODE (GROUP_MODE and owned by `group`
    with one), and the inode of its file; OSError with a message that says why not."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, MODE)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, GROUP_MODE)
        inode = os.stat(path).st_ino
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, inode


def remove_unix(path: Path, inode: int) -> None:
    """Remove the socket file bound at `path` if it is still that one (inode `inode`)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _clear_stale(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket (not removed)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_SECONDS)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:  # nothing listens: left by a server that is gone
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use: a server answers on it")
