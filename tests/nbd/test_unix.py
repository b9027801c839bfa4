# NBD on a Unix socket (--nbd-listen unix:PATH): real clients over it, the socket's mode keeping
# other users out, TLS over it, what a node does with a file already at the path, and the flag.
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.settings import HostPort, Settings, UnixPath, parse_nbd_listen
from node.tls import check_protected
from ramster.client.local import LocalNode
from tests.conftest import ramster
from tests.nbd.conftest import Certs, MiB, nbd_node, need, node_exits, run

NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")  # one that user nobody may run (ours is under /root)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's own are 0700), so that only the socket file's
    own mode decides who connects."""
    with tempfile.TemporaryDirectory(prefix="ramster-nbd-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def unix_node(sock: Path, *args: str) -> LocalNode:
    return nbd_node(*args, listen=f"unix:{sock}")


def uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def connects_as_nobody(sock: Path) -> bool:
    """Whether user `nobody` can open a connection to the socket."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
    )
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", probe, str(sock)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode in (0, 3), done.stderr
    return done.returncode == 0


def test_real_clients_over_a_unix_socket_that_only_its_owner_can_open(
    open_dir: Path, tmp_path: Path
) -> None:
    need("nbdcopy", "nbdinfo", "qemu-io")
    sock = open_dir / "nbd.sock"
    with unix_node(sock, "--nbd-export", "disk:16Mi", "--nbd-export", "swap:64Mi") as node:
        assert sock.stat().st_mode & 0o777 == 0o600
        listed = json.loads(run("nbdinfo", "--list", "--json", uri(sock)))
        assert {e["export-name"]: e["export-size"] for e in listed["exports"]} == {
            "disk": 16 * MiB,
            "swap": 64 * MiB,
        }
        data = os.urandom(3 * MiB) + bytes(MiB) + b"page" * (MiB // 4)
        src, back = tmp_path / "in.img", tmp_path / "out.img"
        src.write_bytes(data)
        run("nbdcopy", str(src), uri(sock, "disk"))
        run("nbdcopy", uri(sock, "disk"), str(back))
        assert back.read_bytes()[: len(data)] == data
        qemu = ["qemu-io", "-f", "raw", uri(sock, "swap")]
        run(*qemu, "-c", "write -P 0x5a 1000 9000", "-c", "read -P 0x5a 1000 9000")
        listing = ramster("nbd", "list", "--json", "--target", f"unix:{sock}")
        assert listing.returncode == 0, listing.stderr
        assert [e["name"] for e in json.loads(listing.stdout)] == ["disk", "swap"]
        if os.geteuid() == 0 and SYSTEM_PYTHON.exists():  # another user: refused by the
            # file's mode, let in without it
            assert not connects_as_nobody(sock)
            sock.chmod(0o666)
            assert connects_as_nobody(sock)
        assert node.running
        assert node.stop() == 0
    assert not sock.exists()  # removed on a graceful stop


def test_a_socket_group_may_connect_too(open_dir: Path, tmp_path: Path) -> None:
    need("nbdinfo")
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root, to give the socket to a group and connect as another user")
    sock = open_dir / "nbd.sock"
    with unix_node(sock, "--nbd-socket-group", str(NOBODY), "--nbd-export", "disk:1Mi"):
        info = sock.stat()
        assert (info.st_mode & 0o777, info.st_gid) == (0o660, NOBODY)
        assert connects_as_nobody(sock)  # a member of the group (its own primary group)
        run("nbdinfo", uri(sock, "disk"))


def test_a_socket_group_needs_a_unix_socket_and_a_real_group(tmp_path: Path) -> None:
    export = ("--nbd-export", "disk:1Mi")
    tcp = node_exits(tmp_path, *export, "--nbd-listen", "127.0.0.1:0", "--nbd-socket-group", "0")
    assert tcp.returncode == 1 and "--nbd-socket-group needs --nbd-listen unix:PATH" in tcp.stderr
    unknown = node_exits(
        tmp_path,
        *export,
        *("--nbd-listen", f"unix:{tmp_path}/s", "--nbd-socket-group", "no-such-group-x"),
    )
    assert unknown.returncode == 2 and "no group named 'no-such-group-x'" in unknown.stderr


def test_tls_over_a_unix_socket(certs: Certs, open_dir: Path) -> None:
    need("nbdinfo")
    s = certs.node
    assert s.tls_cert and s.tls_key and s.tls_ca
    sock = open_dir / "tls.sock"
    tls = ("--node-id", "n1", "--tls-cert", str(s.tls_cert), "--tls-key", str(s.tls_key))
    with unix_node(sock, *tls, "--tls-ca", str(s.tls_ca), "--nbd-export", "disk:8Mi"):
        secure = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs.client_dir}"
        assert json.loads(run("nbdinfo", "--json", secure))["exports"][0]["export-size"] == 8 * MiB
        listing = ramster("nbd", "list", "--target", f"unix:{sock}", "--tls-ca", str(s.tls_ca))
        assert listing.returncode == 0 and "disk" in listing.stdout, listing.stderr
        plain = subprocess.run(["nbdinfo", uri(sock, "disk")], capture_output=True, timeout=60)
        assert plain.returncode != 0
        refused = ramster("nbd", "list", "--target", f"unix:{sock}")
        assert refused.returncode == 2 and "requires TLS" in refused.stderr


def start_fails(sock: Path, tmp_path: Path) -> str:
    """What a node that cannot listen at `sock` says, once it has exited."""
    done = node_exits(
        tmp_path / "other", "--nbd-listen", f"unix:{sock}", "--nbd-export", "disk:1Mi"
    )
    assert done.returncode == 1, done.stderr
    (line,) = [json.loads(x) for x in done.stderr.splitlines() if "startup_failed" in x]
    return str(line["error"])


def test_a_stale_socket_is_replaced_but_a_live_one_or_another_file_is_not(
    open_dir: Path, tmp_path: Path
) -> None:
    need("nbdinfo")
    sock = open_dir / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listened, closed: what a killed server leaves
    stale.close()
    with unix_node(sock, "--nbd-export", "disk:1Mi") as node:
        run("nbdinfo", uri(sock, "disk"))
        assert "is in use" in start_fails(sock, tmp_path)
        run("nbdinfo", uri(sock, "disk"))  # the live node's socket was left alone
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=30)
    assert sock.exists()  # a killed node cannot remove it: the next start does
    with unix_node(sock, "--nbd-export", "disk:1Mi") as node:
        run("nbdinfo", uri(sock, "disk"))
        assert node.stop() == 0
    assert not sock.exists()
    sock.write_text("not a socket")
    assert "is not a socket" in start_fails(sock, tmp_path)
    assert sock.read_text() == "not a socket"


def test_the_flag_takes_an_address_or_a_unix_path() -> None:
    assert parse_nbd_listen("127.0.0.1:10809") == HostPort("127.0.0.1", 10809)
    assert parse_nbd_listen("unix:/run/ramster/nbd.sock") == UnixPath(Path("/run/ramster/nbd.sock"))
    assert str(UnixPath(Path("/x.sock"))) == "unix:/x.sock"
    assert parse_nbd_listen("  ") is None
    for bad, why in (("unix:", "unix:PATH"), ("nbd.sock", "HOST:PORT or unix:PATH")):
        with pytest.raises(ValueError, match=why):
            parse_nbd_listen(bad)
    # a Unix socket is this host's only: no TLS needed, as on loopback
    check_protected(Settings(nbd_listen=UnixPath(Path("/x.sock"))), None, False, None)
