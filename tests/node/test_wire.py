# ramster/wire.py is the one home of the wire conventions: its enums are the proto's numbers, the
# engine files its put results in them, and the node reaches them without the client package.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ramster.v1 import tmem_pb2 as pb
from ramster.wire import (
    PAGE_SIZE,
    BatchError,
    KeyOutOfRange,
    Outcome,
    PageStatus,
    batch_keys,
    check_pages,
    page_views,
)
from ramster.zcache import PoolKind, PutResult, ZCache, ZCacheConfig

ROOT = Path(__file__).resolve().parents[2]


def test_enums_are_the_proto_numbers() -> None:
    assert {o.name: o.value for o in Outcome} == {
        name.removeprefix("PUT_OUTCOME_"): value
        for name, value in pb.PutOutcome.items()
        if value != pb.PUT_OUTCOME_UNSPECIFIED
    }
    assert {s.name: s.value for s in PageStatus} == {
        name.removeprefix("PAGE_STATUS_"): value
        for name, value in pb.PageStatus.items()
        if value != pb.PAGE_STATUS_UNSPECIFIED
    }


def test_the_engine_returns_wire_outcomes() -> None:
    engine = ZCache(ZCacheConfig(pool_limit_frames=64))
    pool = engine.create_pool(PoolKind.PERSISTENT)
    assert PutResult is Outcome
    assert engine.put(pool, 1, 0, bytes(PAGE_SIZE)) == pb.PUT_OUTCOME_SAME_FILLED
    assert engine.put(pool, 1, 1, bytes(range(256)) * 16) == pb.PUT_OUTCOME_STORED


def test_the_node_does_not_import_the_client_package() -> None:
    code = (
        "import sys, node.server, node.main; "
        "print(sorted(m for m in sys.modules if m.startswith('ramster.client')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_page_views_share_the_blob() -> None:
    blob = bytearray(b"a" * PAGE_SIZE + b"b" * PAGE_SIZE)
    views = page_views(blob, 2)
    blob[PAGE_SIZE] = ord("c")  # a view sees the blob, not a copy of it
    assert [bytes(v[:2]) for v in views] == [b"aa", b"cb"]
    with pytest.raises(BatchError, match="3 keys need 12288 bytes of pages, got 8192"):
        page_views(blob, 3)


def test_batch_checks_name_what_is_wrong() -> None:
    assert batch_keys([7], [1, 2]) == [(7, 1), (7, 2)]
    assert batch_keys([7, 8], [1, 2]) == [(7, 1), (8, 2)]
    with pytest.raises(BatchError, match="1 or 2 object ids"):
        batch_keys([7, 8, 9], [1, 2])
    with pytest.raises(KeyOutOfRange, match=f"indexes holds {2**32}"):
        batch_keys([7], [1, 2**32])
    with pytest.raises(BatchError, match="page 1 of the batch is 10 bytes"):
        check_pages([bytes(PAGE_SIZE), bytes(10)])
