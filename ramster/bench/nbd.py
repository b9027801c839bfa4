# `ramster bench nbd`: a node's NBD export against `nbdkit memory` (the reference C RAM disk),
# with the same clients, the same data and the same steps, in one run.
#
# Steps: a sequential write of `size` bytes of a page corpus (cycled) with nbdcopy from a file,
# the resident memory of each server once the data is in, a sequential read with nbdcopy to
# null:, then `ops` random 4 KiB writes and as many random 4 KiB reads through libnbd (queue
# depth 32; Debian's binding runs under the system Python, so that client is a subprocess too).
# Both servers run side by side and every step alternates between them, `repeat` times, keeping
# each server's best time: on a machine shared with other work the load drifts, and a ratio of
# two numbers taken minutes apart would measure the drift.  Every byte is verified (a copy back to
# a file for the sequential data; the random reads are compared with what was written as they
# complete).  Rates are MiB/s.  "Data per GiB of RSS" is the bytes written over the server's RSS
# after the sequential writes: nbdkit keeps pages as they are, the node compresses them, so the
# ratio shows what a GiB of a host's RAM holds on each.  The node's RSS includes the interpreter
# (~55 MiB), which large sizes amortise; the idle RSS is reported too.  The node is started here
# (a LocalNode subprocess) with a pool limit of twice `size`, so nothing leaves RAM during the run.
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


def _random_io(uri: str, source: Path, ops: int, seed: int) -> tuple[float, float]:
    """Seconds of `ops` random 4 KiB writes, then of as many reads (each one verified)."""
    size = source.stat().st_size
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", RANDOM_IO, uri, str(source), str(size), str(ops), str(seed)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise BenchError(f"random 4 KiB I/O failed: {done.stderr.strip()[-500:]}")
    rand = json.loads(done.stdout)
    if rand["errors"] or rand["bad_reads"]:
        raise BenchError(
            f"{uri}: {rand['errors']} failed and {rand['bad_reads']} wrong random I/Os"
        )
    return rand["write_s"], rand["read_s"]


def measure(
    servers: dict[str, tuple[str, int]], source: Path, ops: int, seed: int, repeat: int
) -> dict[str, dict[str, Any]]:
    """The steps of the header against each server (name: URI and pid), interleaved."""
    size, mib = source.stat().st_size, 2**20
    best: dict[str, dict[str, float]] = {name: {} for name in servers}

    def keep(name: str, step: str, seconds: float) -> None:
        best[name][step] = min(seconds, best[name].get(step, seconds))

    out = {name: {"rss_idle_MiB": rss_bytes(pid) / mib} for name, (_, pid) in servers.items()}
    for _ in range(repeat):
        for name, (uri, _) in servers.items():
            keep(name, "seq_write", _tool("nbdcopy", str(source), uri))
    for name, (_, pid) in servers.items():
        out[name]["rss_MiB"] = rss_bytes(pid) / mib
        out[name]["data_per_GiB_rss_GiB"] = size / rss_bytes(pid)
    for _ in range(repeat):
        for name, (uri, _) in servers.items():
            keep(name, "seq_read", _tool("nbdcopy", uri, "null:"))
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        for name, (uri, _) in servers.items():
            back = Path(tmp) / f"{name}.img"
            _tool("nbdcopy", uri, str(back))
            out[name]["verified"] = _same_file(source, back)
            back.unlink()
    for _ in range(repeat):
        for name, (uri, _) in servers.items():
            write_s, read_s = _random_io(uri, source, ops, seed)
            keep(name, "rand4k_write", write_s)
            keep(name, "rand4k_read", read_s)
    ops = min(ops, size // 4096)
    for name, steps in best.items():
        for step, seconds in steps.items():
            moved = ops * 4096 if step.startswith("rand") else size
            out[name][f"{step}_MiBps"] = moved / seconds / mib
    return out


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


def run(pages: list[bytes], size: int, ops: int, repeat: int = 3, seed: int = 1) -> dict[str, Any]:
    """Both servers, side by side, with the same data."""
    check_tools()
    with (
        tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp,
        nbdkit_memory(size) as kit,
        ramster_node(size) as ours,
    ):
        source = corpus_image(pages, size, tmp)
        got = measure({"ramster": ours, "nbdkit": kit}, source, ops, seed, repeat)
    result: dict[str, Any] = {"size_MiB": size / 2**20, "random_ops": ops, "repeat": repeat}
    for key in got["nbdkit"]:
        if key != "verified":
            result[f"ramster_{key}"] = got["ramster"][key]
            result[f"nbdkit_{key}"] = got["nbdkit"][key]
    result["throughput_vs_nbdkit"] = {
        key.removesuffix("_MiBps"): round(got["ramster"][key] / got["nbdkit"][key], 2)
        for key in got["nbdkit"]
        if key.endswith("MiBps")
    }
    density = got["ramster"]["data_per_GiB_rss_GiB"] / got["nbdkit"]["data_per_GiB_rss_GiB"]
    result["density_vs_nbdkit"] = density
    result["verified"] = bool(got["ramster"]["verified"] and got["nbdkit"]["verified"])
    return result
