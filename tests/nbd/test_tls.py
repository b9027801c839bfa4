# TLS on the NBD port (STARTTLS, the protocol's FORCEDTLS mode) against clients nobody here
# wrote: nbdinfo, nbdcopy and nbdsh with nbds:// URIs and libnbd's tls-certificates directory,
# with certificates from `ramster certs`.  A plaintext client, a client that distrusts the
# server's CA, and (with client auth) a client without a certificate of the cluster are refused,
# and the server goes on serving the rest.  With --nbd-allow, a client sees only the exports
# its certificate may use.
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node.nbd import NbdTls
from node.tls import Rotation, load_tls
from ramster.nbd import Export
from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    GREETING,
    OPTION_REPLY_HEADER,
    Option,
    OptionReply,
    info_request,
    option_request,
)
from tests.conftest import ramster
from tests.nbd.conftest import Certs, MiB, ServerThread, eventually, need, node_exits, run
from tests.nbd.test_clients import NBDSH, need_libnbd, recv_exactly


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[ServerThread]:
    with ServerThread([Export("disk", 64 * MiB), Export("small", MiB)], tls=certs.tls()) as s:
        yield s


def nbdsh(uri: str, script: str) -> tuple[str, ...]:
    """nbdsh connected to `uri` over TLS (reading the certificates directory named in a URI is
    local file access, which libnbd allows only when asked), then running `script`."""
    connect = f"h.set_uri_allow_local_file(True); h.connect_uri({uri!r})"
    return (*NBDSH, "-c", f"{connect}; assert h.get_tls_negotiated(); {script}")


def fails(*cmd: str) -> str:
    """Run a client that must fail; its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0, f"{' '.join(cmd)} succeeded: {done.stdout[-500:]}"
    return done.stderr


def assert_serving_tls(server: ServerThread, certs: Certs) -> None:
    listed = json.loads(run("nbdinfo", "--list", "--json", server.uri("", certs.client_dir)))
    assert listed["TLS"] and [e["export-name"] for e in listed["exports"]] == ["disk", "small"]


def test_nbdinfo_lists_exports_over_tls(tls_server: ServerThread, certs: Certs) -> None:
    need("nbdinfo")
    assert_serving_tls(tls_server, certs)
    info = json.loads(run("nbdinfo", "--json", tls_server.uri("small", certs.client_dir)))
    assert info["TLS"] and info["exports"][0]["export-size"] == MiB


def test_data_written_over_tls_reads_back_byte_identical(
    tls_server: ServerThread, certs: Certs, sample_pages: list[bytes], tmp_path: Path
) -> None:
    need("nbdcopy")
    need_libnbd()
    uri = tls_server.uri("disk", certs.client_dir)
    data = b"".join(sample_pages * 4)[: 16 * MiB]
    data += random.Random(5).randbytes(32 * MiB - len(data))
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(data)
    run("nbdcopy", str(src), uri)
    run("nbdcopy", uri, str(dst))
    assert dst.read_bytes()[: len(data)] == data
    # libnbd from Python: an unaligned write inside TLS, read back on a new connection
    patch = os.urandom(10000)
    run(*nbdsh(uri, "h.pwrite(sys.stdin.buffer.read(), 12345)"), input=patch)
    got = run(*nbdsh(uri, "sys.stdout.buffer.write(h.pread(20000, 10000))"))
    assert got == data[10000:12345] + patch + data[22345:30000]


def test_a_plaintext_client_is_refused(tls_server: ServerThread, certs: Certs) -> None:
    need("nbdinfo")
    fails("nbdinfo", tls_server.uri("disk"))
    fails("nbdinfo", "--list", tls_server.uri(""))
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        recv_exactly(sock, GREETING.size)
        sock.sendall(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
        for option, data in ((Option.LIST, b""), (Option.GO, info_request("disk", ()))):
            sock.sendall(option_request(option, data))
            _, _, reply, length = OPTION_REPLY_HEADER.unpack(
                recv_exactly(sock, OPTION_REPLY_HEADER.size)
            )
            assert reply == OptionReply.ERR_TLS_REQD and recv_exactly(sock, length)
        sock.sendall(option_request(Option.EXPORT_NAME, b"disk"))  # cannot fail: a hang-up
        assert sock.recv(1) == b""
    assert_serving_tls(tls_server, certs)


def test_clear_text_after_starttls_is_hung_up_on(tls_server: ServerThread, certs: Certs) -> None:
    need("nbdinfo")
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        recv_exactly(sock, GREETING.size)
        sock.sendall(  # STARTTLS, and an option smuggled behind it before the server's ACK
            CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE)
            + option_request(Option.STARTTLS)
            + option_request(Option.LIST)
        )
        assert sock.recv(1) == b""
    assert_serving_tls(tls_server, certs)


def test_a_client_that_distrusts_the_servers_ca_is_refused(
    tls_server: ServerThread, certs: Certs
) -> None:
    need("nbdinfo")
    error = fails("nbdinfo", tls_server.uri("disk", certs.foreign_dir))
    assert "certificate" in error
    assert_serving_tls(tls_server, certs)


def test_with_client_auth_only_certificates_of_the_cluster_get_in(
    certs: Certs, tmp_path: Path
) -> None:
    need("nbdinfo")
    foreign_client = tmp_path / "foreign-client"  # trusts our CA, shows a foreign certificate
    foreign_client.mkdir()
    (foreign_client / "ca-cert.pem").write_bytes((certs.client_dir / "ca-cert.pem").read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (foreign_client / name).write_bytes((certs.foreign_dir / name).read_bytes())
    (foreign_client / "client-key.pem").chmod(0o600)
    anonymous = tmp_path / "anonymous"  # trusts our CA, shows no certificate
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((certs.client_dir / "ca-cert.pem").read_bytes())
    with ServerThread([Export("disk", MiB)], tls=certs.tls(client_auth=True)) as server:
        fails("nbdinfo", server.uri("disk", foreign_client))
        fails("nbdinfo", server.uri("disk", anonymous))
        assert json.loads(run("nbdinfo", "--json", server.uri("disk", certs.client_dir)))["TLS"]
        lister = ["nbd", "list", "--target", f"127.0.0.1:{server.port}", "--json", "--tls-ca"]
        lister.append(str(certs.client_dir / "ca-cert.pem"))
        assert ramster(*lister).returncode == 2  # no certificate to show
        mine = [str(certs.client_dir / f) for f in ("client-cert.pem", "client-key.pem")]
        done = ramster(*lister, "--tls-cert", mine[0], "--tls-key", mine[1])
        assert done.returncode == 0 and json.loads(done.stdout)[0]["name"] == "disk"
    with ServerThread([Export("disk", MiB)], tls=certs.tls(client_auth=False)) as server:
        assert json.loads(run("nbdinfo", "--json", server.uri("disk", anonymous)))["TLS"]


def test_ramster_nbd_list_over_tls(tls_server: ServerThread, certs: Certs) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    ca = str(certs.client_dir / "ca-cert.pem")
    done = ramster("nbd", "list", "--json", "--target", target, "--tls-ca", ca)
    assert done.returncode == 0, done.stderr
    assert [e["name"] for e in json.loads(done.stdout)] == ["disk", "small"]
    done = ramster("nbd", "list", "--target", target)
    assert done.returncode == 2 and "requires TLS" in done.stderr
    foreign_ca = str(certs.foreign_dir / "ca-cert.pem")
    done = ramster("nbd", "list", "--target", target, "--tls-ca", foreign_ca)
    assert done.returncode == 2 and "certificate verify failed" in done.stderr


def test_qemu_io_over_tls_with_a_client_certificate(certs: Certs) -> None:
    need("qemu-io")
    creds = f"tls-creds-x509,id=tls0,dir={certs.client_dir},endpoint=client"  # CA, c1's cert
    with ServerThread([Export("small", MiB)], tls=certs.tls(client_auth=True)) as server:
        image = f"driver=nbd,host=127.0.0.1,port={server.port},export=small,tls-creds=tls0"
        commands = ["write -P 7 1000 5000", "write -P 9 8192 4096", "read -P 7 1000 5000"]
        args = ["qemu-io", "--object", creds, "--image-opts", image]
        out = run(*args, *[x for c in commands for x in ("-c", c)]).decode()
        assert "fail" not in out.lower() and out.count("read 5000/5000") == 1
        out = run(*args, "-c", "read -P 9 8192 4096", "-c", "read -P 0 0 1000").decode()
        assert "fail" not in out.lower() and out.count("read ") == 2


def test_certificates_rotate_without_a_restart(certs: Certs, tmp_path: Path) -> None:
    need("nbdinfo")
    live = tmp_path / "live"  # the files the node was started with, replaced in place below
    live.mkdir()
    node = certs.node
    assert node.tls_cert and node.tls_key and node.tls_ca
    for path in (node.tls_cert, node.tls_key, node.tls_ca):
        shutil.copyfile(path, live / path.name)
    settings = replace(
        node,
        tls_cert=live / node.tls_cert.name,
        tls_key=live / node.tls_key.name,
        tls_ca=live / node.tls_ca.name,
    )
    tls = load_tls(settings)
    assert tls is not None
    with ServerThread([Export("disk", MiB)], tls=NbdTls(settings, Rotation(settings, tls))) as s:
        assert json.loads(run("nbdinfo", "--json", s.uri("disk", certs.client_dir)))["TLS"]
        foreign = certs.foreign_dir.parent  # the foreign bundle: another CA, node n1 as well
        for name, source in (
            (node.tls_cert.name, foreign / "nodes" / "n1.crt"),
            (node.tls_key.name, foreign / "nodes" / "n1.key"),
            (node.tls_ca.name, foreign / "ca.crt"),
        ):
            shutil.copyfile(source, live / f"{name}.new")
            os.replace(live / f"{name}.new", live / name)
        # the next handshake serves the new certificate: only the new CA's clients trust it
        assert json.loads(run("nbdinfo", "--json", s.uri("disk", certs.foreign_dir)))["TLS"]
        fails("nbdinfo", s.uri("disk", certs.client_dir))


def test_an_export_named_by_nbd_allow_serves_its_clients_only(certs: Certs, tmp_path: Path) -> None:
    """disk is c1's, vm2 is c2's, small is everyone's: each client lists and reaches its own
    and the open one, and to it the other's does not exist."""
    need("nbdinfo", "nbdcopy")
    exports = [Export("disk", MiB), Export("small", MiB), Export("vm2", MiB)]
    allow = [("disk", "c1"), ("vm2", "c2")]
    with ServerThread(exports, tls=certs.tls(client_auth=True), allow=allow) as server:
        for client_dir, own, other in (
            (certs.client_dir, "disk", "vm2"),
            (certs.other_dir, "vm2", "disk"),
        ):
            listed = json.loads(run("nbdinfo", "--list", "--json", server.uri("", client_dir)))
            assert sorted(e["export-name"] for e in listed["exports"]) == sorted([own, "small"])
            data = os.urandom(MiB)
            (tmp_path / own).write_bytes(data)
            run("nbdcopy", str(tmp_path / own), server.uri(own, client_dir))
            run("nbdcopy", server.uri(own, client_dir), str(tmp_path / "back"))
            assert (tmp_path / "back").read_bytes() == data
            error = fails("nbdinfo", server.uri(other, client_dir))
            assert "unknown" in error.lower() or "no such" in error.lower(), error
            fails("nbdcopy", server.uri(other, client_dir), str(tmp_path / "stolen"))
        # the refused clients' connections go once the server has read their close
        assert eventually(lambda: server.call(lambda: len(server.server.connections)) == 0)


def test_nbd_allow_needs_client_auth_and_declared_exports(certs: Certs, tmp_path: Path) -> None:
    tls = ["--node-id", "n1", "--tls-cert", str(certs.node.tls_cert)]
    tls += ["--tls-key", str(certs.node.tls_key), "--tls-ca", str(certs.node.tls_ca)]
    nbd = ["--nbd-listen", "127.0.0.1:0", "--nbd-export", "vm1:1Mi"]
    for at, (args, message) in enumerate(
        (
            ([*nbd, "--nbd-allow", "vm1=c1"], "needs TLS with --tls-client-auth"),
            ([*tls, *nbd, "--nbd-allow", "vm1=c1"], "needs TLS with --tls-client-auth"),
            ([*tls, "--tls-client-auth", *nbd, "--nbd-allow", "vm2=c1"], "no --nbd-export"),
        )
    ):
        done = node_exits(tmp_path / str(at), *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    done = node_exits(tmp_path / "data", *nbd, "--nbd-allow", "vm1")
    assert done.returncode == 2 and "EXPORT=CLIENT" in done.stderr
