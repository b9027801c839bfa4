# A node whose pool overflows writes pages back to data_dir/backing.dat; after a SIGKILL, a node
# started on the same data directory finds its pools and every written-back page again; a
# graceful stop (SIGTERM) writes back the pages in RAM too, so every page comes back.
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ramster.client import Client, PageStatus
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
            assert all(s in (PageStatus.HIT, PageStatus.MISS) for s in got.statuses)
        log = node.log()
        assert '"event": "backing_file_recovered"' in log
        assert ('"clean_stop": true' in log) is (how == "sigterm")
        # a crash is an ERROR naming the pools that may have lost pages; a graceful stop is not
        lost = f'"event": "persistent_pages_may_be_lost", "pools": [{pool}]'
        assert (lost in log) is (how == "sigkill")


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
