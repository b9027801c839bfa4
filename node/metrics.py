# Prometheus metrics of a node, on their own registry and HTTP port.
#
# Engine numbers are not pushed: the data path does no metric work per page, and a scrape reads
# what it needs when it comes.  The engine, the backing file and the ramster layer are changed
# by the event loop and are not thread-safe, while prometheus_client scrapes on its HTTP
# server's thread, so a scrape never reads them itself: the node's LoopCollector posts one read
# of every source to the loop (call_soon_threadsafe) and waits for it, values the loop will not
# touch again (the engine's frozen Snapshot, a copy of the backing file's counters, the layer's
# families built there), then renders the families on the scrape thread.
#
# Asked for at scrape time rather than published by the loop on a timer: the loop spends nothing
# while nobody scrapes (one read of a few microseconds per pool when someone does, not one every
# period), the numbers are as fresh as the scrape, and no task or timer has to be kept alive.
# The price is that a scrape waits for the loop's next turn; if the loop is stalled for
# SCRAPE_TIMEOUT (or closed), the last values read are served again, so a scrape is never an
# error and never blocks for long.  What one scrape reads is one consistent state (it is read in
# one turn of the loop): puts equal the sum of outcomes, pages per frame are those pages over
# those frames.  (Code on the loop must not scrape its own node synchronously: it would wait on
# itself, and get the last values.)
#
# gRPC metrics use the names and labels of go-grpc-prometheus (grpc_server_started_total,
# grpc_server_handled_total, grpc_server_handling_seconds) so existing dashboards work; the
# interceptor updates them once per RPC through label children cached per method (prometheus
# client metrics lock for themselves).  A Stream or Pages call carries many requests and counts
# once there, so the servicer counts and times each of its requests too
# (ramster_stream_requests_total, ramster_stream_request_seconds: by method, operation, code).
# The CPU time of the node's threads, by role (loop, codec workers, gRPC's), is read from /proc
# at scrape time too (node/threadcpu.py).
# Every label has a bounded set of values (methods, codes, outcomes, reasons, operations); keys
# and peers never become labels.  The HTTP server is prometheus_client's, on a daemon thread,
# bounded (node/metricshttp.py); port 0 picks a free port.
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.metricshttp import MetricsServer, serve_metrics
from node.settings import HostPort
from node.threadcpu import ThreadCpuCollector
from ramster.zcache import Snapshot
from ramster.zcache.backing import BackingFile, BackingStats

# RPC latencies span ~100 us (one page) to seconds (a 4096-page batch on a busy node).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
LOOP_LAG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 3,
)  # fmt: skip
STALL_WINDOW = 10.0  # seconds the worst-stall gauge looks back (at least; at most twice that)
SCRAPE_TIMEOUT = 2.0  # seconds a scrape waits for the loop before serving the last value
T = TypeVar("T")


Rendering = Callable[[], Iterable[Metric]]  # families made off the loop from values read on it


class LoopCollector(Collector):
    """Families of state only the event loop may touch.  Each source runs on the loop and
    returns a rendering: a callable that makes families from values the loop will not change
    afterwards (a frozen snapshot, a copy), run on the scraping thread.  All sources are read in
    one turn of the loop, so they agree with each other; a stalled or closed loop gets the last
    renderings run again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.loop, self.timeout = loop, timeout
        self.sources: list[Callable[[], Rendering]] = []
        self._last: list[Rendering] = []

    def add(self, read: Callable[[], T], render: Callable[[T], Iterable[Metric]]) -> None:
        """Serve the families `render` makes of what `read` returns on the loop."""
        self.sources.append(lambda: partial(render, read()))

    def collect(self) -> Iterator[Metric]:
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is closed, or stalled
            self._last = self._read_on_loop()
        return iter([family for rendering in self._last for family in rendering()])

    def _read_all(self) -> list[Rendering]:
        return [source() for source in self.sources]

    def _read_on_loop(self) -> list[Rendering]:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # collected on the loop itself: no one to wait for
            return self._read_all()
        done: concurrent.futures.Future[list[Rendering]] = concurrent.futures.Future()

        def read() -> None:
            if not done.set_running_or_notify_cancel():  # the scrape gave up waiting
                return
            try:
                done.set_result(self._read_all())
            except Exception as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(read)
        try:
            return done.result(timeout=self.timeout)
        finally:
            done.cancel()  # a read still queued is skipped


def engine_families(s: Snapshot) -> Iterator[Metric]:
    """Engine gauges and counters, from one snapshot."""
    yield GaugeMetricFamily(
        "ramster_pool_size_bytes", "Memory of page frames in use.", s.size_bytes
    )
    yield GaugeMetricFamily(
        "ramster_pool_limit_bytes", "Memory page frames may use.", s.limit_bytes
    )
    yield GaugeMetricFamily(
        "ramster_stored_pages", "Pages held, same-filled pages included.", s.stored_pages
    )
    yield GaugeMetricFamily(
        "ramster_zpages", "Pages held in page frames (compressed or raw).", s.zpages
    )
    yield GaugeMetricFamily(
        "ramster_pages_per_frame", "Stored zpages per page frame in use.", s.pages_per_frame
    )
    yield GaugeMetricFamily("ramster_pools", "Pools that exist.", len(s.pools))
    yield CounterMetricFamily("ramster_puts", "Pages put.", s.puts)
    outcomes = CounterMetricFamily(
        "ramster_put_outcomes", "Pages put, by what became of them.", labels=["outcome"]
    )
    refused = CounterMetricFamily(
        "ramster_puts_refused", "Pages refused, by reason.", labels=["reason"]
    )
    for reason, count in s.outcome_counts().items():
        outcomes.add_metric([reason], count)
        if reason in ("poor_compression", "no_room"):
            refused.add_metric([reason], count)
    yield outcomes
    yield refused
    gets = CounterMetricFamily(
        "ramster_gets",
        "Pages asked for, by result (corrupt: failed verification; unavailable: out of reach).",
        labels=["result"],
    )
    gets.add_metric(["hit"], s.hits)
    gets.add_metric(["miss"], s.misses)
    gets.add_metric(["corrupt"], s.corrupt)
    gets.add_metric(["unavailable"], s.unavailable)
    yield gets
    yield CounterMetricFamily(
        "ramster_evictor_hits",
        "Pages served from the evictor (backing file, peers) rather than RAM.",
        s.evictor_hits,
    )
    yield CounterMetricFamily(
        "ramster_duplicate_puts", "Puts that replaced a page under the same key.",
        s.duplicate_puts,
    )  # fmt: skip
    yield CounterMetricFamily("ramster_flushes", "Pages flushed.", s.flushes)
    yield CounterMetricFamily(
        "ramster_compacted_frames", "Page frames freed by compaction.", s.compacted_frames
    )
    yield GaugeMetricFamily(
        "ramster_written_back_pages",
        "Persistent pages held outside RAM by the evictor (backing file, peers).",
        s.evicted_pages,
    )
    yield CounterMetricFamily(
        "ramster_reclaim_passes", "Times the reaper ran at the pool limit.", s.reclaim_passes
    )
    yield CounterMetricFamily(
        "ramster_reclaim_frames", "Page frames freed by the reaper.", s.reclaimed_frames
    )
    evicted = CounterMetricFamily(
        "ramster_evicted_pages",
        "Pages the reaper took out of RAM: ephemeral ones dropped, persistent ones written "
        "back through the evictor.",
        labels=["pool_kind"],
    )
    evicted.add_metric(["ephemeral"], s.evicted_ephemeral)
    evicted.add_metric(["persistent"], s.evicted_persistent)
    yield evicted
    yield CounterMetricFamily(
        "ramster_evict_refused_pages",
        "Persistent pages the evictor refused during reclaim (they stayed in RAM).",
        s.evict_refused,
    )


@dataclass(frozen=True)
class BackingReading:
    stats: BackingStats  # a copy, which the loop does not change
    size_bytes: int
    room_bytes: int


def read_backing(backing: BackingFile) -> BackingReading:
    """The backing file's counters, copied (on the loop)."""
    return BackingReading(replace(backing.stats), backing.size_bytes, backing.room_bytes)


def backing_families(r: BackingReading) -> Iterator[Metric]:
    """The backing file's counters as metrics: write-back, errors, damage found."""
    b = r.stats
    for name, value, text in (
        ("written_back", b.written_back, "Records written to the backing file."),
        ("loaded", b.loaded, "Records read back from the backing file."),
        ("write_errors", b.write_errors, "Write-backs that failed (e.g. disk full)."),
        ("refused_full", b.refused_full, "Write-backs refused at the backing file limit."),
        ("corrupt_records", b.corrupt, "Records that failed verification when read."),
        ("torn_records", b.torn, "Records with a damaged header dropped on open."),
        ("damaged_records", b.damaged, "Records kept on open whose data is damaged."),
        ("recovered_records", b.recovered, "Records found when the file was opened."),
    ):
        yield CounterMetricFamily(f"ramster_backing_{name}", text, value)
    yield GaugeMetricFamily("ramster_backing_size_bytes", "Size of the backing file.", r.size_bytes)
    yield GaugeMetricFamily(
        "ramster_backing_room_bytes",
        "Disk set aside past the backing file's records to save RAM's persistent pages at a stop.",
        r.room_bytes,
    )


def lost_pools_families(count: int) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "ramster_pools_lost",
        "Persistent pools marked lost by a crash of the node (their gets of pages they lack "
        "answer LOST), until their owners accept the loss.",
        count,
    )


class GrpcMetrics:
    """go-grpc-prometheus server metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class StreamMetrics:
    """Requests on Stream and Pages calls, which the gRPC metrics count once per call however
    many requests it carries: by method, operation and status code, with their latency.  Every
    label has a bounded set of values (two methods, the request operations, gRPC codes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ramster_stream_requests_total",
            "Requests served on Stream and Pages calls, by method, operation and status code.",
            ["grpc_method", "op", "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "ramster_stream_request_seconds",
            "Time the node took to serve a request on a Stream or Pages call.",
            ["grpc_method", "op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, op: str, code: str, seconds: float) -> None:
        """One request served: `code` in the Go spelling of the grpc_code label."""
        key = (method, op, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(method, op, code),
                self.seconds.labels(method, op),
            )
        children[0].inc()
        children[1].observe(seconds)


def observe_many(histogram: Histogram, amount: float, times: int) -> None:
    """`times` observations of `amount` in a histogram (a labelled child) at the cost of one: the
    sum grows by amount * times and the bucket `amount` falls in by `times`, as that many
    observe() calls would leave them.  For a batch whose requests all took the batch's time
    (NBD counts a group's requests so: ~20,000 a GiB of nbdcopy writes, whose observe() each cost
    a lock per call).  Reaches into prometheus_client's Histogram (its _sum, _upper_bounds and
    per-bucket _buckets, private names): tests/node/test_metrics.py holds it to observe()."""
    histogram._sum.inc(amount * times)
    for bucket, bound in zip(histogram._buckets, histogram._upper_bounds, strict=True):
        if amount <= bound:
            bucket.inc(times)
            return


class NbdMetrics:
    """NBD exports: requests by command and result, bytes moved, latency, connections.  The
    export label's values are the configured exports, so it stays bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ramster_nbd_requests_total",
            "NBD requests served, by export, command and result (ok, or the NBD error).",
            ["export", "command", "result"],
            registry=registry,
        )
        self.rejected = Counter(
            "ramster_nbd_rejected_total",
            "NBD requests refused before running (out of range, too long, bad flags), by error.",
            ["export", "error"],
            registry=registry,
        )
        self.bytes = Counter(
            "ramster_nbd_bytes_total",
            "Bytes read from and written to NBD exports.",
            ["export", "direction"],
            registry=registry,
        )
        self.seconds = Histogram(
            "ramster_nbd_request_seconds",
            "Time the node took to serve an NBD request.",
            ["export", "command"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connections = Gauge(
            "ramster_nbd_connections", "Open NBD client connections.", registry=registry
        )
        self.lost_blocks = Counter(
            "ramster_nbd_lost_blocks_total",
            "Blocks of an NBD export found lost at the node's start: its block map says they "
            "hold data, the engine has no page for them (in RAM alone at a crash).  A read of "
            "one fails with EIO until it is written, zeroed or trimmed again.",
            ["export"],
            registry=registry,
        )
        self.read_waits = Counter(
            "ramster_nbd_read_waits_total",
            "NBD read groups that waited for pages whose every copy was out of reach (holders "
            "frozen, cut off or restarting), by how the wait ended: resumed (every page came "
            "back) or failed (EIO after --nbd-read-wait, or at a stop).",
            ["export", "outcome"],
            registry=registry,
        )
        self.dropped = Counter(
            "ramster_nbd_connections_dropped_total",
            "NBD connections the node closed unserved: over --nbd-max-connections at once "
            "(reason=limit), over a quarter of it negotiating from one source (one IPv4 "
            "address, IPv6 /64 or Unix user: reason=source_limit), or not through negotiation "
            "in time (reason=negotiation_timeout).",
            ["reason"],
            registry=registry,
        )


class LoopStallMetrics:
    """Event-loop stalls (node/loopwatch.py samples them): every sample in a histogram, whose
    rate of samples over 1-2 ms is the share of time a small call waits; and the worst sample of
    the last STALL_WINDOW to 2 x STALL_WINDOW seconds as a gauge, which a scrape every 15 s still
    catches after the histogram's rate has averaged a lone long stall away.  The window is two
    halves that take turns (no per-sample list); observe() runs on the loop, and the gauge and
    histogram lock for the scrape thread themselves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "ramster_event_loop_lag_seconds",
            "How long a callback posted to the event loop waited to run: what a small call "
            "waits behind work that does not yield.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.worst = Gauge(
            "ramster_event_loop_stall_max_seconds",
            f"Longest event-loop stall in the last {STALL_WINDOW:g} to {2 * STALL_WINDOW:g} s.",
            registry=registry,
        )
        self._turn = time.monotonic()
        self._before = self._now = 0.0  # worst of the previous window, of this one

    def observe(self, stall: float) -> None:
        self.histogram.observe(stall)
        if time.monotonic() - self._turn >= STALL_WINDOW:
            self._turn = time.monotonic()
            self._before, self._now = self._now, 0.0
        self._now = max(self._now, stall)
        self.worst.set(max(self._before, self._now))


class NodeMetrics:
    """The registry of one node and the HTTP server that exposes it.  Made on the event loop,
    whose state `on_loop` reads for each scrape: the engine's snapshot from the start, and
    whatever on_loop.add() adds (the backing file, the ramster layer)."""

    def __init__(self, snapshot: Callable[[], Snapshot], version: str, node_id: str) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # go-grpc-prometheus has none
        self.registry = CollectorRegistry(auto_describe=False)
        self.on_loop = LoopCollector(asyncio.get_running_loop())
        self.on_loop.add(snapshot, engine_families)
        self.registry.register(self.on_loop)
        self.grpc = GrpcMetrics(self.registry)
        self.streams = StreamMetrics(self.registry)
        self.nbd = NbdMetrics(self.registry)  # declared even without NBD, as dashboards expect
        self.loop_lag = LoopStallMetrics(self.registry)
        self.registry.register(ThreadCpuCollector())  # made here, on the loop's thread
        build = Gauge(
            "ramster_build_info",
            "Build of the node (always 1).",
            ["version", "python", "node_id"],
            registry=self.registry,
        )
        build.labels(version, platform.python_version(), node_id).set(1)
        self._http: tuple[MetricsServer, threading.Thread] | None = None

    def serve(self, where: HostPort) -> int:
        """Start the HTTP endpoint; the port it listens on."""
        self._http = serve_metrics(where, self.registry)
        return int(self._http[0].server_port)

    def close(self) -> None:
        if self._http:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
