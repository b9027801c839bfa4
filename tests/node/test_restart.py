# A node whose pool overflows writes pages back to data_dir/backing.dat; after a graceful stop, or
# a SIGKILL, a node started on the same data directory finds every written-back page again.
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
            assert stats.written_back_pages == written
            assert [p.pool for p in client.list_pools()] == [pool]
            got = client.get_many(pool, 3, 0, len(pages))
            hits = [i for i, s in enumerate(got.statuses) if s is PageStatus.HIT]
            assert len(hits) == written  # what was in RAM is gone, what was on disk is back
            assert all(got.pages[i] == pages[i] for i in hits)
            assert all(s in (PageStatus.HIT, PageStatus.MISS) for s in got.statuses)
        log = node.log()
        assert '"event": "backing_file_recovered"' in log
        assert ('"clean_stop": true' in log) is (how == "sigterm")
