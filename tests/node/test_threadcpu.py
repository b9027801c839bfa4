# CPU time by thread role (node/threadcpu.py): roles from a /proc-shaped directory the test
# writes (so every reading is known), counters that never go back when a thread ends or its id
# is reused, native threads by their /proc names, and a real node whose (native) codec worker
# and loop show up once it has coded pages.
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from node.engine import codec_workers
from node.server import Node
from node.threadcpu import CODEC_PREFIX, GRPC_POLLER, ThreadCpuCollector
from ramster.client import AsyncClient, KeyRange
from ramster.procstat import TICKS
from tests.node.conftest import node_settings
from tests.node.test_metrics import scrape, value

GRPC_TID = 4_000_000  # past any pid_max: no Python thread has it
NATIVE_CODEC_TID = 4_000_001  # a native codec worker (node/codecworkers.py), named in /proc


def write_stat(tasks: Path, tid: int, utime: int, stime: int) -> None:
    (tasks / str(tid)).mkdir(exist_ok=True)
    fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 30]
    (tasks / str(tid) / "stat").write_text(f"{tid} (a name) with) spaces) {' '.join(fields)}\n")


def readings(collector: ThreadCpuCollector) -> dict[str, float]:
    (family,) = collector.collect()
    return {s.labels["role"]: s.value for s in family.samples}


@contextmanager
def live_thread(name: str) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name=name)
    thread.start()
    yield thread
    stop.set()
    thread.join()


@pytest.fixture
def codec_thread() -> Iterator[threading.Thread]:
    """A live Python thread named as the codec workers are."""
    with live_thread(f"{CODEC_PREFIX}_0") as thread:
        yield thread


def test_native_threads_are_codec_workers_by_their_proc_name_else_grpc(tmp_path: Path) -> None:
    collector = ThreadCpuCollector(tmp_path)
    write_stat(tmp_path, NATIVE_CODEC_TID, 9, 0)
    (tmp_path / str(NATIVE_CODEC_TID) / "comm").write_text(f"{CODEC_PREFIX}_0\n")
    write_stat(tmp_path, GRPC_TID, 4, 0)
    (tmp_path / str(GRPC_TID) / "comm").write_text("event_engine\n")
    got = readings(collector)
    assert (got["codec"], got["grpc"]) == (9 / TICKS, 4 / TICKS)


def test_grpc_poller_and_other_python_threads(tmp_path: Path) -> None:
    collector = ThreadCpuCollector(tmp_path)
    with live_thread(f"Thread-1 {GRPC_POLLER}") as poller, live_thread("loopwatch") as watch:
        assert poller.native_id is not None and watch.native_id is not None
        write_stat(tmp_path, poller.native_id, 7, 0)
        write_stat(tmp_path, watch.native_id, 0, 3)
        got = readings(collector)
    assert (got["grpc"], got["other"]) == (7 / TICKS, 3 / TICKS)


def test_roles_and_counters_that_never_go_back(
    tmp_path: Path, codec_thread: threading.Thread
) -> None:
    collector = ThreadCpuCollector(tmp_path)
    loop, codec = threading.get_native_id(), codec_thread.native_id
    assert codec is not None
    write_stat(tmp_path, loop, 300, 100)
    write_stat(tmp_path, codec, 500, 0)
    write_stat(tmp_path, GRPC_TID, 20, 30)
    (tmp_path / "self").mkdir()  # not a thread id: ignored
    (tmp_path / "12").mkdir()  # a thread that ended before its stat was read: skipped
    seconds = 1 / TICKS
    assert readings(collector) == {
        "loop": 400 * seconds,
        "codec": 500 * seconds,
        "grpc": 50 * seconds,
        "other": 0.0,
    }
    (tmp_path / str(codec) / "stat").unlink()  # the worker ended: its time stays counted
    (tmp_path / str(codec)).rmdir()
    write_stat(tmp_path, GRPC_TID, 5, 0)  # its id now a new thread's, which has used less
    assert readings(collector) == {
        "loop": 400 * seconds,
        "codec": 500 * seconds,
        "grpc": 55 * seconds,
        "other": 0.0,
    }
    write_stat(tmp_path, GRPC_TID, 15, 0)
    assert readings(collector)["grpc"] == 65 * seconds


def test_a_thread_keeps_its_first_role(tmp_path: Path, codec_thread: threading.Thread) -> None:
    """A thread first seen before Python knew it counts where it was first put, so a role's
    counter does not drop when the thread's name becomes known."""
    collector = ThreadCpuCollector(tmp_path)
    codec = codec_thread.native_id
    assert codec is not None
    collector._role = lambda tid, name: "grpc"  # type: ignore[method-assign]
    write_stat(tmp_path, codec, 100, 0)
    assert readings(collector)["grpc"] == 100 / TICKS
    del collector._role  # back to the class's
    write_stat(tmp_path, codec, 200, 0)
    after = readings(collector)
    assert (after["grpc"], after["codec"]) == (200 / TICKS, 0.0)


def test_without_proc_every_role_reads_zero(tmp_path: Path) -> None:
    assert set(readings(ThreadCpuCollector(tmp_path / "missing")).values()) == {0.0}


async def test_a_node_shows_its_codec_worker_and_its_loop(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    node = Node(node_settings(tmp_path, worker_threads=1))
    await node.start()
    try:
        assert node.engine is not None and codec_workers(node.engine) is not None
        async with AsyncClient(node.target, timeout=30) as client:
            pool = await client.create_pool()
            pages = sample_pages[:88] * 12  # 1,056 compressible pages a batch
            for _ in range(40):  # ~42k pages coded, a few tenths of a second of LZ4
                await client.put_batch(pool, KeyRange(1, 0, len(pages)), pages)
                text = await scrape(node)
                if value(text, "ramster_thread_cpu_seconds_total", role="codec") > 0:
                    break
        for role in ("codec", "loop"):  # gRPC's threads may not have used a whole tick yet
            assert value(text, "ramster_thread_cpu_seconds_total", role=role) > 0, role
    finally:
        await node.stop(grace=1)
