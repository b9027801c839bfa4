# The NBD server against clients nobody here wrote: nbdinfo, nbdcopy, qemu-io, qemu-img (with an
# ext4 image checked by e2fsck) and libnbd through nbdsh, plus hostile bytes on a raw socket.
# Each test ends with the server still serving.
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ramster.nbd import Export
from ramster.nbd.wire import (
    CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAGS,
    GREETING,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    Command,
    Info,
    Option,
    info_request,
    option_request,
)
from tests.conftest import CORPUS
from tests.nbd.conftest import MiB, ServerThread, need, run

# nbdsh, run by the system Python that Debian's libnbd binding (python3-libnbd) belongs to
NBDSH = ("/usr/bin/python3", "-m", "nbd")


def need_libnbd() -> None:
    probe = subprocess.run([*NBDSH, "-c", "pass"], capture_output=True, check=False)
    if probe.returncode:
        pytest.skip("needs python3-libnbd (a Debian package; .ci/run installs it)")


def written_pages(server: ServerThread) -> int:
    assert server.engine is not None
    engine = server.engine
    return server.call(lambda: sum(p.index.count for p in engine.pools.values()))


def assert_serving(server: ServerThread) -> None:
    """A fresh client still gets the export list."""
    listed = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{server.port}"))
    assert [e["export-name"] for e in listed["exports"]] == [e.name for e in server.exports]


def test_nbdinfo_lists_exports_and_sizes(nbd_server: ServerThread) -> None:
    need("nbdinfo")
    listed = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{nbd_server.port}"))
    got = {e["export-name"]: e for e in listed["exports"]}
    assert {name: e["export-size"] for name, e in got.items()} == {"disk": 64 * MiB, "small": MiB}
    disk = got["disk"]
    assert disk["block_size_preferred"] == 4096 and disk["block_size_minimum"] == 1
    assert disk["can_trim"] and disk["can_zero"] and disk["can_flush"] and disk["can_multi_conn"]
    assert listed["protocol"] == "newstyle-fixed" and not listed["TLS"]


def test_nbdinfo_on_an_unknown_export_fails_cleanly(nbd_server: ServerThread) -> None:
    need("nbdinfo")
    done = subprocess.run(["nbdinfo", nbd_server.uri("nope")], capture_output=True, text=True)
    assert done.returncode != 0 and "No such file or directory for export: nope" in done.stderr
    assert_serving(nbd_server)


def image(pages: list[bytes], size: int, seed: int) -> bytes:
    """`size` bytes: real memory pages back to back, then random bytes."""
    real = b"".join(pages)[: size // 2]
    return real + random.Random(seed).randbytes(size - len(real))


def round_trip(server: ServerThread, data: bytes, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(data)
    run("nbdcopy", str(src), server.uri("disk"))
    run("nbdcopy", server.uri("disk"), str(dst))
    assert dst.read_bytes() == data


def test_nbdcopy_round_trip(
    nbd_server: ServerThread, sample_pages: list[bytes], tmp_path: Path
) -> None:
    need("nbdcopy")
    round_trip(nbd_server, image(sample_pages * 40, 64 * MiB, seed=1), tmp_path)


@pytest.mark.slow
def test_nbdcopy_round_trip_256_mib_of_real_pages(
    sample_pages: list[bytes], tmp_path: Path
) -> None:
    need("nbdcopy")
    corpora = sorted(CORPUS.glob("*.pages")) if CORPUS.exists() else []
    real = b"".join(p.read_bytes() for p in corpora) or b"".join(sample_pages) * 400
    data = image([real] * (1 + 128 * MiB // len(real)), 256 * MiB, seed=2)
    with ServerThread([Export("disk", 256 * MiB)], pool_limit=512 * MiB) as server:
        round_trip(server, data, tmp_path)


def qemu_io_script(size: int, seed: int) -> tuple[list[str], list[str]]:
    """qemu-io writes (patterns, zeroes; many unaligned) and the reads that check the result
    against a model of the bytes."""
    rng = random.Random(seed)
    model = bytearray(size)
    writes = []
    for _ in range(60):
        offset = rng.randrange(size - 1)
        length = rng.randrange(1, min(size - offset, 3 * 4096 + 1))
        if rng.random() < 0.5:  # block aligned
            offset, length = offset // 4096 * 4096, max(1, length // 4096) * 4096
            length = min(length, size - offset)
        pattern = rng.choice([0, *range(1, 256)]) if rng.random() < 0.8 else 0
        zero = pattern == 0
        writes.append(
            f"write -z {offset} {length}" if zero else f"write -P {pattern} {offset} {length}"
        )
        model[offset : offset + length] = bytes([pattern]) * length
    reads, start = [], 0
    for i in range(1, size + 1):
        if i == size or model[i] != model[start]:
            reads.append(f"read -P {model[start]} {start} {i - start}")
            start = i
    return writes, reads


def qemu_io(uri: str, commands: list[str]) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = run(*args, uri).decode()
    assert "fail" not in out.lower(), out
    return out


def test_qemu_io_patterns_including_unaligned(nbd_server: ServerThread) -> None:
    need("qemu-io")
    writes, reads = qemu_io_script(256 * 1024, seed=3)
    qemu_io(nbd_server.uri("small"), writes)
    out = qemu_io(nbd_server.uri("small"), reads)  # a new connection reads what the last wrote
    assert out.count("read ") == len(reads)


def test_qemu_img_convert_of_an_ext4_image_and_back(
    nbd_server: ServerThread, tmp_path: Path
) -> None:
    need("qemu-img", "mke2fs", "e2fsck", "debugfs")
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    contents = {"random.bin": os.urandom(3 * MiB + 123), "sub/text.txt": b"block device\n" * 9000}
    for name, data in contents.items():
        (files / name).write_bytes(data)
    img, copy = tmp_path / "fs.img", tmp_path / "copy.img"
    run("mke2fs", "-q", "-t", "ext4", "-d", str(files), "-F", str(img), "64M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), nbd_server.uri("disk"))
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_server.uri("disk"), str(copy))
    run("e2fsck", "-fn", str(copy))
    for name, data in contents.items():
        assert run("debugfs", "-R", f"cat /{name}", str(copy)) == data
    assert copy.read_bytes() == img.read_bytes()


LIBNBD_SCRIPT = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fast_zero()
block = bytes(range(256)) * 16
h.pwrite(block * 64, 0)                         # 64 blocks
h.trim(16 * 4096, 8 * 4096)                     # blocks 8..23: contents unspecified afterwards
h.zero(10000, 30 * 4096 + 100)                  # unaligned at both ends
h.zero(4 * 4096, 48 * 4096, nbd.CMD_FLAG_FAST_ZERO)
h.flush()
got = h.pread(64 * 4096, 0)
want = bytearray(block * 64)
want[30 * 4096 + 100 : 30 * 4096 + 100 + 10000] = bytes(10000)
want[48 * 4096 : 52 * 4096] = bytes(4 * 4096)
assert got[: 8 * 4096] == want[: 8 * 4096] and got[24 * 4096 :] == want[24 * 4096 :]
h.pwrite(block * 16, 8 * 4096, nbd.CMD_FLAG_FUA)
assert h.pread(64 * 4096, 0) == bytes(want[: 8 * 4096]) + block * 16 + bytes(want[24 * 4096 :])
h.shutdown()
print("ok")
"""


def test_libnbd_trim_zero_and_flush(nbd_server: ServerThread) -> None:
    need_libnbd()
    script = f"URI = {nbd_server.uri('disk')!r}\n" + LIBNBD_SCRIPT
    assert run(*NBDSH, "-c", script).strip() == b"ok"
    # zeroed whole blocks cost nothing: 48..51 are gone, and 31, the one block wholly inside
    # the unaligned zero range (30 and 32 keep data beside their zeroes)
    assert written_pages(nbd_server) == 64 - 4 - 1


def test_a_client_killed_mid_request(nbd_server: ServerThread) -> None:
    need("nbdinfo")
    need_libnbd()
    script = f"""
import sys, time, nbd
h = nbd.NBD()
h.connect_uri({nbd_server.uri("disk")!r})
buf = nbd.Buffer.from_bytearray(bytearray(b"x" * (32 << 20)))
for i in range(2):
    h.aio_pwrite(buf, i << 25)
h.poll(0)
print("sent", flush=True)
time.sleep(600)
"""
    client = subprocess.Popen([*NBDSH, "-c", script], stdout=subprocess.PIPE)
    assert client.stdout is not None and client.stdout.readline() == b"sent\n"
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert_serving(nbd_server)
    data = os.urandom(MiB)
    run(
        *NBDSH,
        "-u",
        nbd_server.uri("small"),
        "-c",
        "h.pwrite(sys.stdin.buffer.read(), 0)",
        input=data,
    )
    got = run(
        *NBDSH, "-u", nbd_server.uri("small"), "-c", "sys.stdout.buffer.write(h.pread(1 << 20, 0))"
    )
    assert got == data


def test_a_full_pool_fails_writes_with_enospc(tmp_path: Path) -> None:
    need("nbdcopy")
    with ServerThread([Export("disk", 64 * MiB)], pool_limit=4 * MiB) as server:
        src = tmp_path / "random.img"
        src.write_bytes(os.urandom(16 * MiB))
        done = subprocess.run(["nbdcopy", str(src), server.uri("disk")], capture_output=True)
        assert done.returncode != 0 and b"No space left on device" in done.stderr
        assert_serving(server)


# -- hostile bytes on a raw socket ---------------------------------------------------------------
def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert len(recv_exactly(sock, GREETING.size)) == GREETING.size
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def negotiated(server: ServerThread) -> socket.socket:
    sock = connect(server)
    sock.sendall(CLIENT_FLAGS.pack(CLIENT_FLAG_FIXED_NEWSTYLE))
    sock.sendall(option_request(Option.GO, info_request("small", (Info.BLOCK_SIZE,))))
    while True:  # INFO replies, then ACK
        header = recv_exactly(sock, OPTION_REPLY_HEADER.size)
        _, _, reply, length = OPTION_REPLY_HEADER.unpack(header)
        recv_exactly(sock, length)
        if reply == 1:
            return sock


def request(command: int, offset: int, length: int, handle: int = 1) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, 0, command, handle, offset, length)


def closed_by_server(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


@pytest.mark.parametrize(
    "hostile",
    [
        b"\xff\xff\xff\xff",  # unknown client flags
        CLIENT_FLAGS.pack(1) + b"NOTMAGIC" + bytes(8),
        CLIENT_FLAGS.pack(1) + option_request(Option.EXPORT_NAME, b"no such export"),
    ],
)
def test_hostile_handshakes_are_hung_up_on(nbd_server: ServerThread, hostile: bytes) -> None:
    with connect(nbd_server) as sock:
        sock.sendall(hostile)
        assert closed_by_server(sock)
    assert_serving(nbd_server)


def test_hostile_requests_get_errors_or_a_hang_up(nbd_server: ServerThread) -> None:
    need_libnbd()
    with negotiated(nbd_server) as sock:
        sock.sendall(request(Command.READ, MiB - 10, 20, handle=1))  # past the end
        sock.sendall(request(Command.WRITE, 0, (32 << 20) + 1, handle=2))  # over the maximum
        sock.sendall(bytes((32 << 20) + 1))  # its payload is swallowed, not kept
        sock.sendall(request(Command.READ, 0, 4, handle=3))
        replies = [SIMPLE_REPLY_HEADER.unpack(recv_exactly(sock, 16))[1:] for _ in range(3)]
        assert replies == [(22, 1), (22, 2), (0, 3)]
        assert recv_exactly(sock, 4) == bytes(4)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(10))  # not a request: hang up
        assert closed_by_server(sock)
    with negotiated(nbd_server) as sock:  # a client gone mid-write
        sock.sendall(request(Command.WRITE, 0, 8192) + b"y" * 5000)
    assert_serving(nbd_server)
    got = run(
        *NBDSH, "-u", nbd_server.uri("small"), "-c", "sys.stdout.buffer.write(h.pread(8192, 0))"
    )
    assert got == bytes(8192)  # the half-sent write changed nothing
