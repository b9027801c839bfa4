# A node whose pool overflows writes pages back to data_dir/backing.dat; after a SIGKILL, a node
# started on the same data directory finds its pools and every written-back page again; a
# graceful stop (SIGTERM) writes back the pages in RAM too, so every page comes back.
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ramster.bench.cluster import metric_value
from ramster.client import Client, DataLoss, PageStatus
from ramster.client.local import LocalNode


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_finds_written_back_pages(
    tmp_path: Path, compressible_pages: list[bytes], how: str
) -> None:
    data = tmp_path / "data"
    pages = [compressible_pages[i % 88] for i in range(3000)]
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node:
        with Client(node.target, timeout=60) as client:
            pool = client.create_pool()
            assert not any(o.refused for o in client.put_many(pool, 3, 0, pages))
            written = client.stats().written_back_pages
            assert written > 2000
        if how == "sigterm":
            assert node.stop() == 0
        else:
            node.send_signal(signal.SIGKILL)
            node.wait()
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node:
        with Client(node.target, timeout=60) as client:
            stats = client.stats()
            assert stats.written_back_pages == (len(pages) if how == "sigterm" else written)
            assert [p.pool for p in client.list_pools()] == [pool]
            got = client.get_many(pool, 3, 0, len(pages))
            hits = [i for i, s in enumerate(got.statuses) if s is PageStatus.HIT]
            if how == "sigterm":  # the stop wrote every page in RAM back too
                assert len(hits) == len(pages)
            else:  # what was in RAM alone is gone, what was on disk is back
                assert len(hits) == written
            assert all(got.pages[i] == pages[i] for i in hits)
            # what a crash took is LOST, never a MISS (see the next test)
            assert set(got.statuses) <= {PageStatus.HIT, PageStatus.LOST}
        log = node.log()
        assert '"event": "backing_file_recovered"' in log
        assert ('"clean_stop": true' in log) is (how == "sigterm")
        # a crash is an ERROR naming the pools that may have lost pages; a graceful stop is not
        lost = f'"event": "persistent_pages_may_be_lost", "pools": [{pool}]'
        assert (lost in log) is (how == "sigkill")


def test_a_crash_marks_persistent_pools_lost_until_their_owners_accept_it(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """A crash loses the pages held in RAM alone; their gets say LOST (DATA_LOSS for a single
    get), never MISS, through restarts, until the owner accepts the loss; ephemeral pools and
    graceful stops are left alone."""
    data = tmp_path / "data"
    pages = [compressible_pages[i % 88] for i in range(3000)]
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
        pool, cache = client.create_pool(), client.create_pool(kind="ephemeral")
        assert not any(o.refused for o in client.put_many(pool, 3, 0, pages))
        client.put(cache, 3, 0, pages[0])
        node.kill()
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
        assert {(p.pool, p.lost) for p in client.list_pools()} == {(pool, True), (cache, False)}
        assert metric_value(node, "ramster_pools_lost") == 1
        got = client.get_many(pool, 3, 0, len(pages))
        held = [i for i, s in enumerate(got.statuses) if s is PageStatus.HIT]
        assert 0 < len(held) < len(pages)
        assert all(got.pages[i] == pages[i] for i in held)
        gone = [i for i, s in enumerate(got.statuses) if s is not PageStatus.HIT]
        assert {got.statuses[i] for i in gone} == {PageStatus.LOST}
        with pytest.raises(DataLoss, match="may have lost it"):
            client.get(pool, 3, gone[0])
        assert client.get(pool, 3, held[0]) == pages[held[0]]
        assert client.get_many(cache, 3, 1, 1).statuses == [PageStatus.MISS]
        assert node.stop() == 0
    for _ in range(2):  # graceful restarts keep the mark, in the log as it was and compacted
        with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
            assert client.get_many(pool, 3, gone[0], 1).statuses == [PageStatus.LOST]
            assert node.stop() == 0
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
        assert client.accept_loss(pool) is True
        assert client.accept_loss(pool) is False
        assert not any(p.lost for p in client.list_pools())
        assert metric_value(node, "ramster_pools_lost") == 0
        assert client.get(pool, 3, gone[0]) is None
        statuses = client.get_many(pool, 3, 0, len(pages)).statuses
        assert set(statuses) == {PageStatus.HIT, PageStatus.MISS}
        assert node.stop() == 0
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
        assert not any(p.lost for p in client.list_pools())  # the acceptance is kept too


def test_pools_survive_a_restart_and_ids_are_never_reused(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    data = tmp_path / "data"
    with LocalNode(data_dir=data) as node, Client(node.target, timeout=60) as client:
        kept = client.create_pool(kind="ephemeral", allocator="zbud")
        gone = client.create_pool()
        client.destroy_pool(gone)
        assert node.stop() == 0
    with LocalNode(data_dir=data) as node, Client(node.target, timeout=60) as client:
        (pool,) = client.list_pools()
        assert (pool.pool, pool.kind, pool.allocator) == (kept, "ephemeral", "zbud")
        assert client.create_pool() > gone  # a destroyed pool's id is not handed out again


def test_a_data_dir_of_another_node_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with LocalNode("--node-id", "n1", data_dir=data) as node:
        assert node.stop() == 0
    other = LocalNode("--node-id", "n2", data_dir=data)
    with pytest.raises(Exception, match="belongs to node 'n1'"):
        other.start()
    other.__exit__()


def test_a_second_node_on_a_data_dir_in_use_is_refused_until_the_first_exits(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    data = tmp_path / "data"
    pages = [compressible_pages[i % 88] for i in range(2000)]
    first = LocalNode("--pool-limit", "1Mi", data_dir=data).start()
    try:
        with first.client(timeout=60) as client:
            pool = client.create_pool()
            assert not any(o.refused for o in client.put_many(pool, 3, 0, pages))
        assert first.process is not None
        first.send_signal(signal.SIGSTOP)  # as one still stopping: alive, holding the directory
        second = LocalNode("--pool-limit", "1Mi", data_dir=data)
        with pytest.raises(
            Exception, match=f"in use by another node process \\(pid {first.process.pid}\\)"
        ):
            second.start()
        second.__exit__()
        first.send_signal(signal.SIGCONT)
        assert first.stop() == 0
    finally:
        first.__exit__()
    with LocalNode("--pool-limit", "1Mi", data_dir=data) as node, node.client(60) as client:
        got = client.get_many(pool, 3, 0, len(pages))  # the refused start harmed nothing
        assert got.statuses == [PageStatus.HIT] * len(pages)
        assert got.pages == pages
