# NBD servers for the tests, and the real clients that talk to them.
#
# `nbd_server` runs node/nbd's NbdServer in a thread with its own event loop, over a real
# ZCache whose pools store incompressible pages raw (as an export's pool does; with
# `codec_threads`, an engine with that many codec workers, as --worker-threads gives), on 127.0.0.1
# port 0: the clients under test (nbdinfo, nbdcopy, qemu-io, qemu-img, nbdsh) are subprocesses
# that block, so the server must not share the test's thread.  Tests that need a whole node
# process (settings, restart, metrics, peers) use LocalNode instead (`nbd_node`, listening on
# loopback port 0 or a Unix socket); `node_exits` runs a node meant to stop at start-up.
#
# `certs` is a bundle made by `ramster certs`' code (a CA, node n1, clients c1, c2) plus a foreign
# bundle (another CA, same names), each also laid out as libnbd's tls-certificates directory
# (ca-cert.pem, client-cert.pem, client-key.pem), the way nbdinfo/nbdcopy/nbdsh find them.
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from node.engine import give_codec_workers, stop_codec_workers
from node.metrics import NbdMetrics
from node.nbd import NbdServer, NbdTls
from node.settings import HostPort, Settings
from ramster.certs import make_bundle
from ramster.client.local import LocalNode
from ramster.nbd import Export
from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig

T = TypeVar("T")
MiB = 1024 * 1024


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages; .ci/run installs them)")


def eventually(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Whether `check` holds within `seconds` (asked every 0.01 s): a loaded machine may take
    long, a passing check returns at once."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def nbd_node(*args: str, data_dir: Path | None = None, listen: str = "127.0.0.1:0") -> LocalNode:
    """A node process serving NBD at `listen` (TLS material from --tls-ca in `args`)."""
    tls_ca = Path(args[args.index("--tls-ca") + 1]) if "--tls-ca" in args else None
    return LocalNode("--nbd-listen", listen, *args, data_dir=data_dir, tls_ca=tls_ca)


def node_exits(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A node process run to its end with `args` (one that settings stop at start-up)."""
    node = [sys.executable, "-m", "node", "--listen", "127.0.0.1:0", "--metrics-listen", ""]
    return subprocess.run(
        [*node, "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=60
    )


def run(*cmd: str, input: bytes | None = None, timeout: float = 120) -> bytes:
    """Run a client; its stdout, or a failure that shows its stderr."""
    done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, check=False)
    if done.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class Certs:
    node: Settings  # the TLS settings of node n1 (certificate, key, CA)
    client_dir: Path  # libnbd's tls-certificates directory: our CA, client c1
    foreign_dir: Path  # the same from a foreign CA
    other_dir: Path  # our CA, client c2

    def tls(self, client_auth: bool = False) -> NbdTls:
        return NbdTls(replace(self.node, tls_client_auth=client_auth))


def libnbd_dir(bundle_dir: Path, client: str, out: Path) -> Path:
    out.mkdir()
    (out / "ca-cert.pem").write_bytes((bundle_dir / "ca.crt").read_bytes())
    (out / "client-cert.pem").write_bytes((bundle_dir / "clients" / f"{client}.crt").read_bytes())
    key = out / "client-key.pem"
    key.write_bytes((bundle_dir / "clients" / f"{client}.key").read_bytes())
    key.chmod(0o600)
    return out


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ours, foreign = tmp_path_factory.mktemp("certs"), tmp_path_factory.mktemp("foreign")
    bundle = make_bundle(ours, ["n1"], ["c1", "c2"])
    make_bundle(foreign, ["n1"], ["c1"])
    cert, key = bundle.nodes["n1"]
    node = Settings(node_id="n1", tls_cert=cert, tls_key=key, tls_ca=bundle.ca)
    return Certs(
        node,
        libnbd_dir(ours, "c1", ours / "libnbd"),
        libnbd_dir(foreign, "c1", foreign / "libnbd"),
        libnbd_dir(ours, "c2", ours / "libnbd-c2"),
    )


class ServerThread:
    def __init__(
        self,
        exports: list[Export],
        pool_limit: int = 64 * MiB,
        tls: NbdTls | None = None,
        codec_threads: int = 0,
        allow: Sequence[tuple[str, str]] = (),
        max_connections: int = 64,
    ) -> None:
        self.exports = exports
        self.allow = allow
        self.max_connections = max_connections
        self.pool_limit = pool_limit
        self.tls = tls
        self.codec_threads = codec_threads
        self.port = 0
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: NbdServer | None = None
        self.engine: ZCache | None = None

    def uri(self, export: str, certificates: Path | None = None) -> str:
        """The export's URI; nbds:// with libnbd's certificates directory for TLS."""
        if certificates is None:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbds://127.0.0.1:{self.port}/{export}?tls-certificates={certificates}"

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the server's loop (the engine is not thread-safe); its result."""
        done: Future[T] = Future()

        def run_it() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run_it)
        return done.result(timeout=30)

    async def _start(self) -> None:
        config = ZCacheConfig(
            pool_limit_frames=self.pool_limit // PAGE_SIZE, store_incompressible_raw=True
        )
        engine = self.engine = ZCache(config)
        if self.codec_threads:
            give_codec_workers(engine, self.codec_threads)
        self.server = NbdServer(
            HostPort("127.0.0.1", 0),
            self.exports,
            engine,
            lambda owner: engine.create_pool(PoolKind.PERSISTENT),
            NbdMetrics(self.registry),
            self.tls,
            allow=self.allow,
            max_connections=self.max_connections,
        )
        self.port = await self.server.start()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=5), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()
        if self.engine is not None:
            stop_codec_workers(self.engine)


@pytest.fixture
def nbd_server() -> Iterator[ServerThread]:
    exports = [Export("disk", 64 * MiB), Export("small", 1 * MiB)]
    with ServerThread(exports) as server:
        yield server
