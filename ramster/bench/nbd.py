# `ramster bench nbd`: a node's NBD export against `nbdkit memory` (the reference C RAM disk),
# with the same clients, the same data and the same steps, in one run.
#
# Per server: a sequential write of `size` bytes of a page corpus (cycled) with nbdcopy from a
# file, the resident memory of the server process once the data is in, a sequential read with
# nbdcopy to null:, then `ops` random 4 KiB writes and as many random 4 KiB reads through libnbd
# (queue depth 32; Debian's binding runs under the system Python, so that client is a
# subprocess too).  Every byte is verified after the timed steps (a copy back to a file for the
# sequential data; the random reads are compared with what was written as they complete).
# "Data per GiB of RSS" is the bytes written over the server's RSS after the sequential write:
# nbdkit keeps pages as they are, the node compresses them, so the ratio shows what a GiB of a
# host's RAM holds on each.  The node's RSS includes the interpreter (~100 MB), which large
# sizes amortise; the idle RSS is reported too.
# The node is started here (a LocalNode subprocess) with a pool limit of twice `size`, so
# nothing leaves RAM during the run.
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ramster.bench.report import rss_bytes
from ramster.client.errors import Unavailable
from ramster.client.local import LocalNode

SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-libnbd lives
EXPORT = "bench"
TOOLS = ("nbdcopy", "nbdkit")

# Runs under the system Python: argv = uri, corpus file, region bytes, ops, seed.
RANDOM_IO = r"""
import json, random, sys, time, nbd
uri, corpus = sys.argv[1:3]
region, ops, seed = map(int, sys.argv[3:6])
data = open(corpus, "rb").read(8 << 20)
pages = [data[i : i + 4096] for i in range(0, len(data) - 4095, 4096)]
rng = random.Random(seed)
blocks = rng.sample(range(region // 4096), min(ops, region // 4096))
h = nbd.NBD()
h.connect_uri(uri)
errors = []
def done(err):
    if err.value:
        errors.append(err.value)
    return 1
def drain(depth):
    while h.aio_in_flight() > depth:
        h.poll(-1)
start = time.perf_counter()
for n, block in enumerate(blocks):
    drain(31)
    h.aio_pwrite(pages[n % len(pages)], block * 4096, completion=done)
drain(0)
write_s = time.perf_counter() - start
bad = []
def check(buf, want):
    def finish(err):
        if err.value or buf.to_bytearray() != want:
            bad.append(err.value)
        return 1
    return finish
start = time.perf_counter()
for n, block in enumerate(blocks):
    drain(31)
    buf = nbd.Buffer(4096)
    h.aio_pread(buf, block * 4096, completion=check(buf, pages[n % len(pages)]))
drain(0)
read_s = time.perf_counter() - start
h.shutdown()
print(json.dumps({"ops": len(blocks), "write_s": write_s, "read_s": read_s,
                  "errors": len(errors), "bad_reads": len(bad)}))
"""


class BenchError(Exception):
    """A tool is missing or a step failed; the message says which."""


def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or not Path(SYSTEM_PYTHON).exists():
        raise BenchError(
            f"needs {', '.join(missing) or 'python3-libnbd'}: apt-get install nbdkit libnbd-bin "
            "python3-libnbd"
        )


def _tool(*cmd: str) -> float:
    """Run a client; seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise BenchError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def measure(uri: str, pid: int, source: Path, ops: int, seed: int) -> dict[str, Any]:
    """The steps of the header against one server."""
    size = source.stat().st_size
    idle = rss_bytes(pid)
    write_s = _tool("nbdcopy", str(source), uri)
    rss = rss_bytes(pid)
    read_s = _tool("nbdcopy", uri, "null:")
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        back = Path(tmp) / "back.img"
        _tool("nbdcopy", uri, str(back))
        verified = _same_file(source, back)
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", RANDOM_IO, uri, str(source), str(size), str(ops), str(seed)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise BenchError(f"random 4 KiB I/O failed: {done.stderr.strip()[-500:]}")
    rand = json.loads(done.stdout)
    mb = 1e6
    return {
        "seq_write_MBps": size / write_s / mb,
        "seq_read_MBps": size / read_s / mb,
        "rand4k_write_MBps": rand["ops"] * 4096 / rand["write_s"] / mb,
        "rand4k_read_MBps": rand["ops"] * 4096 / rand["read_s"] / mb,
        "rss_idle_MiB": idle / 2**20,
        "rss_MiB": rss / 2**20,
        "data_per_GiB_rss_GiB": size / rss,
        "verified": verified and not rand["errors"] and not rand["bad_reads"],
    }


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def nbdkit_memory(size: int) -> Iterator[tuple[str, int]]:
    """`nbdkit memory` on a free loopback port: its URI and pid."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ramster-nbdkit-") as tmp:
        pidfile = Path(tmp) / "pid"  # nbdkit writes it once it accepts connections
        proc = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "-P",
                str(pidfile),
                "memory",
                f"size={size}",
            ],
            stderr=subprocess.PIPE,
        )
        try:
            while not pidfile.exists() or not pidfile.read_text().strip():
                if proc.poll() is not None:
                    raise BenchError("nbdkit did not start")
                time.sleep(0.02)
            yield f"nbd://127.0.0.1:{port}", proc.pid
        finally:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def ramster_node(size: int) -> Iterator[tuple[str, int]]:
    """A local node with one export of `size` bytes: its URI and pid."""
    port = free_port()
    node = LocalNode(
        "--pool-limit",
        str(2 * size),
        "--nbd-listen",
        f"127.0.0.1:{port}",
        "--nbd-export",
        f"{EXPORT}:{size}",
        metrics=False,
    )
    try:
        with node:
            assert node.process is not None
            yield f"nbd://127.0.0.1:{port}/{EXPORT}", node.process.pid
    except Unavailable as exc:
        raise BenchError(str(exc)) from None


def corpus_image(pages: list[bytes], size: int, directory: str) -> Path:
    """A file of `size` bytes: the corpus pages back to back, cycled."""
    path = Path(directory) / "source.img"
    block = b"".join(pages)
    with open(path, "wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[: size - start])
    return path


def run(pages: list[bytes], size: int, ops: int, seed: int = 1) -> dict[str, Any]:
    """Both servers, side by side, with the same data."""
    check_tools()
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        source = corpus_image(pages, size, tmp)
        with nbdkit_memory(size) as (uri, pid):
            kit = measure(uri, pid, source, ops, seed)
        with ramster_node(size) as (uri, pid):
            ours = measure(uri, pid, source, ops, seed)
    result: dict[str, Any] = {"size_MiB": size / 2**20, "random_ops": ops}
    for key in kit:
        if key != "verified":
            result[f"ramster_{key}"] = ours[key]
            result[f"nbdkit_{key}"] = kit[key]
    result["throughput_vs_nbdkit"] = {
        key.removesuffix("_MBps"): round(ours[key] / kit[key], 2)
        for key in kit
        if key.endswith("MBps")
    }
    result["density_vs_nbdkit"] = ours["data_per_GiB_rss_GiB"] / kit["data_per_GiB_rss_GiB"]
    result["verified"] = bool(ours["verified"] and kit["verified"])
    return result
