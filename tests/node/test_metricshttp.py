# The metrics endpoint against clients that open connections and never finish a request: the
# node serves SCRAPES at once (a thread each), closes the connections past that at once and the
# slow ones after READ_SECONDS, and then scrapes as before.
from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from node import metricshttp
from node.settings import HostPort
from tests.node.conftest import half_sent

REQUEST_LINE = b"GET /metrics HTTP/1.1\r\n"  # and never the headers' end


@pytest.fixture
def endpoint() -> Iterator[int]:
    """A metrics endpoint on a free port (a counter at 7 in it), stopped after the test."""
    registry = CollectorRegistry()
    Counter("scraped_things", "a counter to find in the scrape", registry=registry).inc(7)
    server, thread = metricshttp.serve_metrics(HostPort("127.0.0.1", 0), registry)
    yield server.server_port
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def closed_by_server(socks: list[socket.socket], within: float) -> int:
    """How many of `socks` the server has closed `within` seconds from now (readable: at their
    end, or reset)."""
    deadline, closed = time.monotonic() + within, set[socket.socket]()
    while (left := deadline - time.monotonic()) > 0 and len(closed) < len(socks):
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], left)
        closed.update(readable)
    return len(closed)


def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def test_connections_past_the_scrapes_served_at_once_are_closed_at_once(endpoint: int) -> None:
    before = threading.active_count()
    slow = half_sent(endpoint, 40, REQUEST_LINE)
    assert closed_by_server(slow, 2) == len(slow) - metricshttp.SCRAPES
    assert threading.active_count() == before + metricshttp.SCRAPES  # a thread each, no more
    for sock in slow:
        sock.close()
    assert "scraped_things_total 7.0" in scrape(endpoint)


def test_a_request_that_does_not_arrive_in_time_is_dropped(
    endpoint: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metricshttp._Handler, "timeout", 0.5)
    before = threading.active_count()
    slow = half_sent(endpoint, metricshttp.SCRAPES, REQUEST_LINE)
    assert closed_by_server(slow, 10) == len(slow)
    assert "scraped_things_total 7.0" in scrape(endpoint)  # the slots came back
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
