# CPU time of the node's threads by role, read from /proc at scrape time.
#
# A node is one process with several busy threads: the event loop (every state change, every
# request's Python), the codec workers (LZ4 and checksums, without the GIL), gRPC's own C
# threads (its event engine: sockets and HTTP/2), and a few helpers (the metrics server, the
# loop watch, asyncio's default executor).  Which of them is saturated tells an operator what
# to do: a loop near one core is the node's bound (more nodes, or NBD's codec workers), workers
# near a core each are LZ4's (more workers, if cores are free), and neither means the clients
# or the network are.  The process's total CPU cannot tell those apart.
#
# ThreadCpuCollector sums utime + stime of /proc/self/task/*/stat (ramster/procstat.py) per role on
# each scrape: "loop" is the thread that made it (the loop's), "codec" the threads whose name starts
# with CODEC_PREFIX (node/codecworkers.py's native workers, named so in /proc, or a Python thread so
# named), "grpc" every other thread Python does not know (gRPC's C threads: its event engine) and
# grpcio's asyncio poller (a Python thread whose default name ends with its target, GRPC_POLLER: it
# waits on gRPC's completion queue and wakes the loop), "other" any other Python thread (the metrics
# server, the loop watch, executors).  The counters must not go back when a thread ends (an idle
# executor thread does): each thread's last reading is kept, and a thread that has gone (or whose id
# a new thread reads less than it had) adds its last reading to its role for good; a thread keeps
# the role it was first given.  What a thread used between the last scrape and its end is not
# counted, an undercount no longer than one scrape interval of one thread.
# Trade-off: a scrape reads one small file per thread (a dozen), a few hundred microseconds;
# nothing is spent between scrapes.  Without /proc (not Linux) every role reads zero.
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ramster.procstat import cpu_seconds

CODEC_PREFIX = "ramster-codec"
NATIVE = "native:"  # before the /proc name of a thread Python does not know
GRPC_POLLER = "(_poll_wrapper)"  # grpc._cython aio's PollerCompletionQueue thread
ROLES = ("loop", "codec", "grpc", "other")


class ThreadCpuCollector(Collector):
    """ramster_thread_cpu_seconds_total{role}; made on the thread that counts as the loop."""

    def __init__(self, tasks: Path = Path("/proc/self/task")) -> None:
        self.tasks = tasks
        self.loop_id = threading.get_native_id()
        self._last: dict[int, tuple[str, float]] = {}  # thread id -> (role, seconds last read)
        self._gone = dict.fromkeys(ROLES, 0.0)  # seconds of threads that have ended, by role
        self._lock = threading.Lock()  # two scrapes at once must not both retire a thread

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ramster_thread_cpu_seconds",
            "CPU time (user + system) of the node's threads by role: the event loop, the codec "
            "workers, gRPC's own threads, and the rest.",
            labels=["role"],
        )
        with self._lock:
            totals = self._read()
        for role in ROLES:
            family.add_metric([role], totals[role])
        yield family

    def _read(self) -> dict[str, float]:
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        now: dict[int, tuple[str, float]] = {}
        try:
            entries = [e for e in self.tasks.iterdir() if e.name.isdigit()]
        except OSError:
            entries = []
        for entry in entries:
            seconds = cpu_seconds(entry / "stat")
            if seconds is None:
                continue  # ended between the listing and the read
            tid = int(entry.name)
            known = self._last.get(tid)
            if known and known[1] <= seconds:
                role = known[0]
            else:
                role = self._role(tid, names.get(tid) or _native_name(entry))
            now[tid] = (role, seconds)
        for tid, (role, seconds) in self._last.items():
            later = now.get(tid)
            if later is None or later[1] < seconds:  # ended (its id may be a new thread's now)
                self._gone[role] += seconds
        self._last = now
        totals = dict(self._gone)
        for role, seconds in now.values():
            totals[role] += seconds
        return totals

    def _role(self, tid: int, name: str) -> str:
        if tid == self.loop_id:
            return "loop"
        if name.removeprefix(NATIVE).startswith(CODEC_PREFIX):
            return "codec"
        if name.startswith(NATIVE) or name.endswith(GRPC_POLLER):
            return "grpc"
        return "other"


def _native_name(entry: Path) -> str:
    """NATIVE and the name /proc gives a thread that Python does not know."""
    try:
        return NATIVE + (entry / "comm").read_text().strip()
    except OSError:
        return NATIVE
