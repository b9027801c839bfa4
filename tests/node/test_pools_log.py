# The pool log on a full disk: its rewrite at open fails, and the log is kept as it is and
# appended to, so a node whose disk filled up comes back on its data.  (A node's own backing
# file gives its room back when it closes, so a node process seldom meets this: the disk has to
# be full for other reasons; the full disk is faked here, see tests/remote/fulldisk.py.)
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node.pools import POOLS_FILE, PoolRecord, PoolRegistry
from ramster import atomicfile
from ramster.zcache import PoolKind
from tests.remote.fulldisk import FullDiskOs


def test_a_pool_log_that_cannot_be_rewritten_opens_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = PoolRegistry(tmp_path)
    first = log.new_id(())
    log.add(PoolRecord(first, PoolKind.PERSISTENT, "zsmalloc", True, "nbd:disk"))
    log.close()
    before = (tmp_path / POOLS_FILE).read_bytes()
    monkeypatch.setattr(atomicfile, "os", FullDiskOs())
    with caplog.at_level(logging.WARNING):
        again = PoolRegistry(tmp_path)
    assert "pools_log_not_compacted" in caplog.text
    assert (tmp_path / POOLS_FILE).read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    second = again.new_id({first})
    again.add(PoolRecord(second, PoolKind.EPHEMERAL, "zbud"))
    again.close()
    monkeypatch.undo()
    assert set(PoolRegistry(tmp_path).pools) == {first, second}
