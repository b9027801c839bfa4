# The metrics HTTP endpoint: prometheus_client's WSGI app on its thread-per-request server,
# bounded.
#
# Stock (prometheus_client's start_http_server), the server starts a thread for every connection
# and waits for its request with no timeout.  A local process that opened 3,000 connections and
# sent half a request on each made the node run 3,013 threads (+87 MB RSS).  When they hung up,
# each thread served its half request as a scrape, and every scrape read the /proc entry of
# every thread (node/threadcpu.py) under one lock: the node burned a whole core for over a
# minute after the client was gone.
#
# Here at most SCRAPES requests are served at once: a connection past that is closed as soon as
# it is accepted (Prometheus retries at its next interval), and a request must arrive within
# READ_SECONDS.  A client that times out or goes away is not reported (socketserver would print
# a traceback to stderr, which is the node's log).  Trade-off: a client that keeps SCRAPES slow
# connections open delays scrapes, by up to READ_SECONDS at a time.
from __future__ import annotations

import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from node.settings import HostPort

SCRAPES = 8  # requests served at once
READ_SECONDS = 10.0  # for a request to arrive, and for each read and write of it

_Request = socket.socket | tuple[bytes, socket.socket]
_Address = Any  # (host, port) or (host, port, flow, scope), by address family


class _Handler(WSGIRequestHandler):
    timeout = READ_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape per interval is no news."""


class MetricsServer(ThreadingWSGIServer):
    """prometheus_client's thread-per-request WSGI server, serving SCRAPES requests at most."""

    request_queue_size = 64  # socketserver's 5 left a burst of connections waiting on SYN retries

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(SCRAPES)
        super().__init__(address, _Handler)

    def process_request(self, request: _Request, client_address: _Address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread of its own
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: _Address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: _Request, client_address: _Address) -> None:
        """A client that timed out or went away: nothing to report."""


def serve_metrics(
    where: HostPort, registry: CollectorRegistry
) -> tuple[MetricsServer, threading.Thread]:
    """Serve `registry` at `where` (port 0: a free one) on a daemon thread."""
    (family, _, _, _, address), *_ = socket.getaddrinfo(
        where.host or None, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    server = MetricsServer((str(address[0]), where.port), family)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
