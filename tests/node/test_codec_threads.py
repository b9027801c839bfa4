# How many codec worker threads a node gets: --worker-threads when given (flag, environment or
# TOML), else two for a node that serves NBD exports (what its big requests want on 2 cores),
# fewer on fewer cores, and none for any other node; a node process logs what it took.
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from node.engine import codec_threads
from node.settings import (
    NBD_WORKERS,
    Settings,
    SettingsError,
    UnixPath,
    parse_nbd_exports,
    resolve,
)
from ramster.client.local import LocalNode
from tests.node.conftest import node_settings

EXPORTS = parse_nbd_exports(["disk:64Mi"])


def nbd_settings(tmp_path: Path, **changes: object) -> Settings:
    base = node_settings(tmp_path, nbd_listen=UnixPath(tmp_path / "nbd.sock"), nbd_export=EXPORTS)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_node_that_serves_nbd_gets_workers_unless_told(tmp_path: Path) -> None:
    serving = nbd_settings(tmp_path)
    assert codec_threads(serving, cores=2) == NBD_WORKERS == 2
    assert codec_threads(serving, cores=16) == NBD_WORKERS
    assert codec_threads(serving, cores=1) == 0  # the workers would only take the loop's core
    assert codec_threads(nbd_settings(tmp_path, worker_threads=0), cores=2) == 0
    assert codec_threads(nbd_settings(tmp_path, worker_threads=3), cores=1) == 3
    # no NBD: the loop codes in slices, best for single gets under bulk load
    assert codec_threads(node_settings(tmp_path), cores=2) == 0
    assert codec_threads(nbd_settings(tmp_path, nbd_export=()), cores=2) == 0
    assert codec_threads(nbd_settings(tmp_path, nbd_listen=None), cores=2) == 0
    assert codec_threads(node_settings(tmp_path, worker_threads=1), cores=2) == 1


def test_worker_threads_parses_a_count_or_auto(tmp_path: Path) -> None:
    assert resolve({}, env={}).worker_threads is None
    assert resolve({"worker_threads": "auto"}, env={}).worker_threads is None
    assert resolve({"worker_threads": "0"}, env={}).worker_threads == 0
    assert resolve({}, env={"RAMSTER_WORKER_THREADS": "4"}).worker_threads == 4
    config = tmp_path / "node.toml"
    config.write_text("worker_threads = 2\n")
    assert resolve({}, env={}, config_file=str(config)).worker_threads == 2
    for bad in ("two", "65", "-1"):
        with pytest.raises(SettingsError, match="expected 0 to 64 threads or auto"):
            resolve({"worker_threads": bad}, env={})


def workers_of(node: LocalNode) -> tuple[int, int]:
    """The codec workers a node process logged, and the encoding threads it runs."""
    (listening,) = [json.loads(line) for line in node.log().splitlines() if '"listening"' in line]
    assert node.process is not None
    tasks = Path(f"/proc/{node.process.pid}/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return listening["codec_workers"], sum(name.startswith("ramster-codec_") for name in names)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: no workers by default")
def test_a_node_process_serving_nbd_starts_its_workers_and_logs_them(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with LocalNode("--nbd-listen", f"unix:{sock}", "--nbd-export", "disk:64Mi") as node:
        assert workers_of(node) == (NBD_WORKERS, NBD_WORKERS)
    with LocalNode() as plain:
        assert workers_of(plain) == (0, 0)
