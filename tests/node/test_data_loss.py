# Damage is reported, not hidden: a node whose written-back records are damaged on disk under it
# answers a unary Get of those pages with DATA_LOSS (the client's DataLoss), a batch with
# PAGE_STATUS_CORRUPT for them only, and `ramster get` with a one-line error and no output file.
#
# The damage is done while the node runs: on a restart, the backing file's recovery scan verifies
# every record's checksums and drops a damaged one as a torn write, so its page would be a miss.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from node.engine import BACKING_FILE
from ramster.client import Client, DataLoss, PageStatus
from ramster.client.local import LocalNode
from ramster.zcache.backing import BLOCK, RECORD_HEAD, RECORD_MAGIC, SUPER_BLOCKS
from ramster.zcache.codec import HEADER_SIZE, zpage_key

OID = 3


def damage_records(backing: Path, count: int) -> list[int]:
    """Flip the first byte of the compressed payload of the first `count` records in place; the
    page indexes they hold.  Record and zpage headers stay intact, so only the zpage's own
    checksum can tell."""
    with backing.open("r+b") as f:
        data = f.read()
        indexes = []
        for at in range(SUPER_BLOCKS * BLOCK, len(data), BLOCK):
            if data[at : at + 4] != RECORD_MAGIC:
                continue
            oid, index = zpage_key(data[at + RECORD_HEAD : at + RECORD_HEAD + HEADER_SIZE])
            assert oid == OID
            payload = at + RECORD_HEAD + HEADER_SIZE
            f.seek(payload)
            f.write(bytes([data[payload] ^ 0xFF]))
            indexes.append(index)
            if len(indexes) == count:
                break
    return indexes


def test_damaged_backing_records_are_data_loss(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    data_dir = tmp_path / "data"
    pages = [compressible_pages[i % 88] for i in range(3000)]
    with (
        LocalNode("--pool-limit", "1Mi", data_dir=data_dir) as node,
        Client(node.target, timeout=60) as client,
    ):
        pool = client.create_pool()
        assert not any(o.refused for o in client.put_many(pool, OID, 0, pages))
        assert client.stats().written_back_pages > 2000
        damaged = damage_records(data_dir / BACKING_FILE, 3)
        assert len(damaged) == 3
        intact = next(i for i in range(len(pages)) if i not in damaged)
        for index in damaged:
            with pytest.raises(DataLoss) as info:
                client.get(pool, OID, index)
            assert info.value.code is grpc.StatusCode.DATA_LOSS
            assert f"pool {pool} page ({OID}, {index}) is lost" in str(info.value)
        got = client.get_batch(pool, [(OID, i) for i in [*damaged, intact]])
        assert got.statuses == [PageStatus.CORRUPT] * 3 + [PageStatus.HIT]
        assert got.pages == [None] * 3 + [pages[intact]] and got.corrupt == [0, 1, 2]
        assert client.stats().corrupt == 6
        out = tmp_path / "out.bin"
        cli = subprocess.run(
            [sys.executable, "-m", "ramster.cli.main", "get", "--target", node.target,
             "--pool", str(pool), "--oid", str(OID), "--start", str(damaged[0]),
             "--pages", "1", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert cli.returncode == 2 and not out.exists()
    assert cli.stderr.splitlines() == [
        f"ramster: error: 1 of 1 pages cannot be read; the first is page {damaged[0]} of object "
        f"{OID} in pool {pool} (corrupt: its data is lost, every copy failed verification)"
    ]
