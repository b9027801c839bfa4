# CI's staleness check: regenerating the stubs from proto/ must reproduce ramster/v1 exactly.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates stubs")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "ramster" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "ramster" / "v1").iterdir() if p.is_file()}
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"ramster/v1 is stale ({stale}): run `python scripts/gen_protos.py`"


def test_stubs_import_absolutely() -> None:
    from ramster.v1 import tmem_pb2, tmem_pb2_grpc

    assert tmem_pb2.DESCRIPTOR.package == "ramster.v1"
    assert hasattr(tmem_pb2_grpc, "TmemStub")
