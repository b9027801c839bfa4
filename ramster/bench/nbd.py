# `ramster bench nbd`: a node's NBD export against `nbdkit memory` (the reference C RAM disk),
# with the same clients, the same data and the same steps, in one run.
#
# Steps: a sequential write of `size` bytes of a page corpus (cycled) with nbdcopy from a file,
# the resident memory of each server once the data is in (and SETTLE_SECONDS passed), a
# sequential read with nbdcopy to null:, then `ops` random 4 KiB writes and as many random 4 KiB
# reads through libnbd (queue depth 32; Debian's binding runs under the system Python, so that
# client is a subprocess too).
# Both servers get the same requests: nbdcopy reads with --no-extents, since nbdkit answers
# block-status queries (the node does not) and nbdcopy would then skip reading the ranges that
# nbdkit reports as zero (the corpus's zero pages, which nbdcopy wrote as WRITE_ZEROES).
# Both servers run side by side and every step alternates between them, `repeat` times, keeping
# each server's best time: on a machine shared with other work the load drifts, and a ratio of
# two numbers taken minutes apart would measure the drift.  The first sequential write, into an
# empty export, is also reported on its own (seq_write_first): both servers then fault in the
# memory they fill, as behind a fresh swap device.  Each server's CPU time in its best
# run is reported as MiB per CPU-second (cpu_efficiency_vs_nbdkit), which load elsewhere on the
# machine hardly moves (the random step's covers its writes and reads together); the node's is
# also split by thread role (its ramster_thread_cpu_seconds_total: event loop, codec workers,
# gRPC's threads, the rest), as CPU-seconds per GiB of the sequential steps, which says whether
# the loop or LZ4 bounds it.  The client's CPU is taken too (nbdcopy's, from the rusage of the
# reaped child), per GiB of each sequential step, and with the server's it gives the step's core
# use: CPU-seconds of server and client over the seconds it took times the cores this process may
# use.  Near 1 the step is bound by CPU on this machine (then only fewer CPU-seconds per GiB, on
# either side, make it faster); well under 1 it waited on something else.  Every byte is verified: a
# copy back to a file for the sequential data; the random reads are compared with what was written
# as they complete.  Rates are MiB/s.  "Data per GiB of RSS" is the bytes written over the server's
# RSS after the sequential writes: nbdkit keeps pages as they are, the node compresses them, so the
# ratio shows what a GiB of a host's RAM holds on each.  The node's RSS includes the interpreter
# (~48 MiB), which large sizes amortise; the idle RSS is reported too.  The node is started here (a
# LocalNode subprocess) with a pool limit of twice `size`, so nothing leaves RAM during the run, and
# with the codec worker threads a node serving NBD has by default (two on 2 cores) unless told.
# With tls, both servers require TLS (certificates from `ramster certs`' code, the node's serving
# nbdkit too) and every client uses nbds:// URIs, so the ratios include each side's TLS cost.
# With unix, both servers listen on Unix sockets (nbd+unix://) instead of loopback TCP ports, as
# clients on a node's own host use it.
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramster.bench.report import rss_bytes
from ramster.bench.scrape import families, thread_cpu
from ramster.certs import make_bundle
from ramster.client.errors import Unavailable
from ramster.client.local import LocalNode
from ramster.procstat import cpu_seconds

SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-libnbd lives
EXPORT = "bench"
NODE_ID = "bench"
TOOLS = ("nbdcopy", "nbdkit")
# The RSS is taken this long after the last write: a node gives back what a burst left in flight
# (its heap's free pages, input buffers, warm frames) once traffic has paused for a quarter of a
# second (node/nbd/server.py), and it is the data held at rest that the ratio is about.
SETTLE_SECONDS = 1.0
ThreadCpu = Callable[[], dict[str, float]]  # a node's threads' CPU seconds so far, by role

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
h.set_uri_allow_local_file(True)  # nbds:// URIs name a certificates directory
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


def _why(done: subprocess.CompletedProcess[str]) -> str:
    """Why a client failed: the end of what it said, or the signal that killed it."""
    said = done.stderr.strip()[-500:]
    if said or done.returncode > 0:
        return said or f"exit status {done.returncode}"
    return f"killed by signal {-done.returncode}"


def _tool(*cmd: str) -> float:
    """Run a client; seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise BenchError(f"{' '.join(cmd)} failed: {_why(done)}")
    return time.perf_counter() - start


RANDOM_STEPS = ("rand4k_write", "rand4k_read")


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
        raise BenchError(f"random 4 KiB I/O failed: {_why(done)}")
    rand = json.loads(done.stdout)
    if rand["errors"] or rand["bad_reads"]:
        raise BenchError(
            f"{uri}: {rand['errors']} failed and {rand['bad_reads']} wrong random I/Os"
        )
    return rand["write_s"], rand["read_s"]


def process_cpu(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far; 0 if it is gone."""
    return cpu_seconds(Path(f"/proc/{pid}/stat")) or 0.0


def clients_cpu() -> float:
    """CPU time (user + system) of the child processes this process has run and reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    servers: dict[str, tuple[str, int]],
    source: Path,
    ops: int,
    seed: int,
    repeat: int,
    threads: dict[str, ThreadCpu] | None = None,
) -> dict[str, dict[str, Any]]:
    """The steps of the header against each server (name: URI and pid), interleaved; per step
    the best time, and the server's and the client's CPU time in that run (the server's by
    thread role too, for a server with a reader in `threads`: seq_write and seq_read as
    CPU-seconds per GiB)."""
    size, mib, gib = source.stat().st_size, 2**20, 2**30
    ops = min(ops, size // 4096)
    threads = threads or {}
    best: dict[str, dict[str, tuple[float, float, float, dict[str, float]]]] = {
        n: {} for n in servers
    }

    def step(name: str, labels: tuple[str, ...], run: Callable[..., Any], *args: Any) -> None:
        """One run of a step against one server: `run(*args)` gives the seconds of each label."""
        pid, roles = servers[name][1], threads.get(name)
        cpu, client, by_role = process_cpu(pid), clients_cpu(), roles() if roles else {}
        took = run(*args)
        cpu, client = process_cpu(pid) - cpu, clients_cpu() - client
        by_role = {role: s - by_role[role] for role, s in roles().items()} if roles else {}
        for label, seconds in zip(labels, took if len(labels) > 1 else (took,), strict=True):
            if label not in best[name] or seconds < best[name][label][0]:
                best[name][label] = (seconds, cpu, client, by_role)

    out: dict[str, dict[str, Any]] = {
        name: {"rss_idle_MiB": rss_bytes(pid) / mib} for name, (_, pid) in servers.items()
    }
    for round_ in range(repeat):
        for name, (uri, _) in servers.items():
            step(name, ("seq_write",), _tool, "nbdcopy", str(source), uri)
            if not round_:  # into an empty export: each server takes its memory as it goes
                best[name]["seq_write_first"] = best[name]["seq_write"]
    time.sleep(SETTLE_SECONDS)
    for name, (_, pid) in servers.items():
        out[name]["rss_MiB"] = rss_bytes(pid) / mib
        out[name]["data_per_GiB_rss_GiB"] = size / rss_bytes(pid)
    for _ in range(repeat):
        for name, (uri, _) in servers.items():
            step(name, ("seq_read",), _tool, "nbdcopy", "--no-extents", uri, "null:")
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        for name, (uri, _) in servers.items():
            back = Path(tmp) / f"{name}.img"
            _tool("nbdcopy", "--no-extents", uri, str(back))
            out[name]["verified"] = _same_file(source, back)
            back.unlink()
    for _ in range(repeat):
        for name, (uri, _) in servers.items():
            step(name, RANDOM_STEPS, _random_io, uri, source, ops, seed)
    cores = len(os.sched_getaffinity(0))
    for name, steps in best.items():
        for label, (seconds, *_) in steps.items():
            moved = ops * 4096 if label.startswith("rand") else size
            out[name][f"{label}_MiBps"] = moved / seconds / mib
        for label in ("seq_write", "seq_read"):
            seconds, cpu, client, by_role = steps[label]
            out[name][f"{label}_MiB_per_cpu_s"] = size / mib / max(cpu, 1e-3)
            out[name][f"{label}_client_cpu_s_per_GiB"] = round(client * gib / size, 2)
            out[name][f"{label}_core_use"] = round((cpu + client) / (seconds * cores), 2)
            if name in threads:
                out[name][f"{label}_cpu_s_per_GiB_by_thread"] = {
                    role: round(s * gib / size, 2) for role, s in by_role.items()
                }
        cpu = steps[RANDOM_STEPS[0]][1]  # one run did both: its CPU covers both directions
        out[name]["rand4k_MiB_per_cpu_s"] = 2 * ops * 4096 / mib / max(cpu, 1e-3)
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


@dataclass(frozen=True)
class BenchTls:
    """Certificates for both servers and the clients (`ramster certs`' code): the node's
    certificate serves nbdkit too; `client_dir` is libnbd's tls-certificates directory."""

    node_cert: Path
    node_key: Path
    ca: Path
    server_dir: Path  # nbdkit's --tls-certificates: ca-cert.pem, server-cert.pem, server-key.pem
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem

    @staticmethod
    def make(directory: Path) -> BenchTls:
        bundle = make_bundle(directory, [NODE_ID], [NODE_ID])
        cert, key = bundle.nodes[NODE_ID]
        client_cert, client_key = bundle.clients[NODE_ID]
        dirs = {}
        for name, files in (
            ("server", {"server-cert.pem": cert, "server-key.pem": key}),
            ("client", {"client-cert.pem": client_cert, "client-key.pem": client_key}),
        ):
            path = dirs[name] = directory / name
            path.mkdir()
            for target, source in {"ca-cert.pem": bundle.ca, **files}.items():
                shutil.copyfile(source, path / target)
                (path / target).chmod(0o600)
        return BenchTls(cert, key, bundle.ca, dirs["server"], dirs["client"])


Where = int | Path  # a server's loopback port, or its Unix socket


def server_uri(where: Where, export: str = "", tls: BenchTls | None = None) -> str:
    """libnbd's URI of an export of the server listening at `where`."""
    scheme = "nbds" if tls else "nbd"
    if isinstance(where, Path):
        query = f"socket={where}" + (f"&tls-certificates={tls.client_dir}" if tls else "")
        return f"{scheme}+unix:///{export}?{query}"
    query = f"?tls-certificates={tls.client_dir}" if tls else ""
    return f"{scheme}://127.0.0.1:{where}/{export}{query}"


@contextlib.contextmanager
def nbdkit_memory(
    size: int, tls: BenchTls | None = None, unix: Path | None = None
) -> Iterator[tuple[str, int]]:
    """`nbdkit memory` on a free loopback port, or on Unix socket `unix` (TLS required with
    `tls`): its URI and pid."""
    where: Where = unix or free_port()
    listen = ["-U", str(where)] if unix else ["-i", "127.0.0.1", "-p", str(where)]
    tls_args = ["--tls=require", f"--tls-certificates={tls.server_dir}"] if tls else []
    with tempfile.TemporaryDirectory(prefix="ramster-nbdkit-") as tmp:
        pidfile = Path(tmp) / "pid"  # nbdkit writes it once it accepts connections
        proc = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "--exit-with-parent",
                *listen,
                "-P",
                str(pidfile),
                *tls_args,
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
            yield server_uri(where, "", tls), proc.pid
        finally:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def ramster_node(
    size: int, tls: BenchTls | None = None, workers: int | None = None, unix: Path | None = None
) -> Iterator[tuple[str, int, ThreadCpu]]:
    """A local node with one export of `size` bytes (TLS with `tls`, `workers` codec worker
    threads, else as many as a node serving NBD has unless told), on a free loopback port or
    on Unix socket `unix`: its URI, its pid, and a reader of its threads' CPU seconds by role."""
    where: Where = unix or free_port()
    tls_args = []
    if tls:
        tls_args = ["--node-id", NODE_ID, "--tls-ca", str(tls.ca)]
        tls_args += ["--tls-cert", str(tls.node_cert), "--tls-key", str(tls.node_key)]
    node = LocalNode(
        "--pool-limit",
        str(2 * size),
        "--nbd-listen",
        f"unix:{where}" if unix else f"127.0.0.1:{where}",
        "--nbd-export",
        f"{EXPORT}:{size}",
        *(() if workers is None else ("--worker-threads", str(workers))),
        *tls_args,
        tls_ca=tls.ca if tls else None,
    )
    try:
        with node:
            assert node.process is not None and node.metrics_port is not None
            metrics = f"127.0.0.1:{node.metrics_port}"
            yield (
                server_uri(where, EXPORT, tls),
                node.process.pid,
                lambda: thread_cpu(families(metrics)),
            )
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


def run(
    pages: list[bytes],
    size: int,
    ops: int,
    repeat: int = 3,
    tls: bool = False,
    workers: int | None = None,
    seed: int = 1,
    unix: bool = False,
) -> dict[str, Any]:
    """Both servers, side by side, with the same data (both over TLS with `tls`, both on Unix
    sockets with `unix`; the node with `workers` codec worker threads, else its default)."""
    check_tools()
    with tempfile.TemporaryDirectory(prefix="ramster-bench-") as tmp:
        certs = BenchTls.make(Path(tmp) / "tls") if tls else None
        kit_at, node_at = (
            (Path(tmp) / "nbdkit.sock", Path(tmp) / "node.sock") if unix else (None, None)
        )
        with (
            nbdkit_memory(size, certs, kit_at) as kit,
            ramster_node(size, certs, workers, node_at) as node,
        ):
            source = corpus_image(pages, size, tmp)
            uri, pid, roles = node
            servers = {"ramster": (uri, pid), "nbdkit": kit}
            got = measure(servers, source, ops, seed, repeat, {"ramster": roles})
    result: dict[str, Any] = {
        "size_MiB": size / 2**20,
        "random_ops": ops,
        "repeat": repeat,
        "tls": tls,
        "transport": "unix" if unix else "tcp",
        "worker_threads": "auto" if workers is None else workers,
    }
    for key in got["nbdkit"]:
        if key != "verified":
            result[f"ramster_{key}"] = got["ramster"][key]
            result[f"nbdkit_{key}"] = got["nbdkit"][key]
    for ratio, suffix in (("throughput", "_MiBps"), ("cpu_efficiency", "_MiB_per_cpu_s")):
        result[f"{ratio}_vs_nbdkit"] = {
            key.removesuffix(suffix): round(got["ramster"][key] / got["nbdkit"][key], 2)
            for key in got["nbdkit"]
            if key.endswith(suffix)
        }
    for label in ("seq_write", "seq_read"):
        key = f"{label}_cpu_s_per_GiB_by_thread"
        result[f"ramster_{key}"] = got["ramster"][key]
    density = got["ramster"]["data_per_GiB_rss_GiB"] / got["nbdkit"]["data_per_GiB_rss_GiB"]
    result["density_vs_nbdkit"] = density
    result["verified"] = bool(got["ramster"]["verified"] and got["nbdkit"]["verified"])
    return result
