# The owner's remote table: narrow columns that widen when they must (pool numbers past 255,
# holders past 8 peers), a disk column that exists only while a disk copy does, and locations
# that never name two versions.
from __future__ import annotations

import pytest

from ramster.remote.table import MAX_HOLDER_PEERS, RemoteTable, TableFull, slot_of


def new_one(table: RemoteTable, pool_id: int, allocator: str) -> int:
    """One new location."""
    (location,) = table.new_many(pool_id, allocator, 1)
    return location


def test_a_few_pools_and_peers_cost_four_bytes_per_page() -> None:
    table = RemoteTable()
    locations = [new_one(table, pool_id=7 + i % 3, allocator="zsmalloc") for i in range(10_000)]
    for i, location in enumerate(locations):
        table.add_holder(location, f"peer{i % 8}:1")
        table.add_holder(location, f"peer{(i + 1) % 8}:1")
    assert table.metadata_bytes() < 4 * 10_000 + 4096
    assert (table.gen.typecode, table.pool.typecode, table.holders.typecode) == ("H", "B", "B")
    assert table.disk is None
    assert [table.pool_of(loc) for loc in locations[:3]] == [7, 8, 9]
    assert table.holders_of(locations[0]) == ["peer0:1", "peer1:1"]


def test_columns_widen_and_keep_their_values() -> None:
    table = RemoteTable()
    first = new_one(table, pool_id=1 << 31, allocator="zbud")
    table.add_holder(first, "a:1")
    for i in range(300):  # pool numbers past 255: the pool column becomes u16
        new_one(table, pool_id=i, allocator="zsmalloc")
    assert table.pool.typecode == "H"
    for i in range(MAX_HOLDER_PEERS - 1):  # bits past 7, then past 15
        table.add_holder(first, f"p{i}:1")
    assert table.holders.typecode == "I"
    assert table.pool_of(first) == 1 << 31 and table.allocator(first) == "zbud"
    assert len(table.holders_of(first)) == MAX_HOLDER_PEERS
    with pytest.raises(TableFull):
        table.add_holder(first, "one-too-many:1")


def test_the_disk_column_exists_only_while_a_disk_copy_does() -> None:
    table = RemoteTable()
    a, b = new_one(table, 1, "zsmalloc"), new_one(table, 1, "zsmalloc")
    table.set_disk(a, 40)
    table.set_disk(b, 41)
    assert table.disk is not None and table.disk_copies == 2
    assert table.live_copies(up=0) == {1: 2}
    table.set_disk(a, 0)
    assert table.disk_of(a) == 0 and table.disk_of(b) == 41
    c = new_one(table, 1, "zsmalloc")  # a new slot while the column exists: it grows too
    assert table.disk_of(c) == 0
    table.free(b)  # its disk copy goes with it, and the column with the last one
    assert table.disk is None and table.disk_copies == 0
    assert table.disk_of(a) == 0


def test_a_freed_slot_comes_back_as_a_new_version_and_pool_numbers_are_reused() -> None:
    table = RemoteTable()
    old = new_one(table, 5, "zsmalloc")
    table.add_holder(old, "h:1")
    table.free(old)
    assert old not in table and table.copies["h:1"] == 0
    assert table.allocators == {}  # pool 5 has no live slot: its number is free
    new = new_one(table, 6, "zbud")
    assert slot_of(new) == slot_of(old) and new != old
    assert new in table and old not in table
    assert table.pool_of(new) == 6 and table.allocator(new) == "zbud"
    assert len(table.pool_ids) == 2  # number 1 served pool 5, then pool 6
    assert list(table) == [new]


def test_restored_locations_keep_their_numbers() -> None:
    table = RemoteTable()
    table.restore(3 << 32 | 9, 4, "zsmalloc")
    table.restore(1 << 32 | 2, 4, "zsmalloc")
    table.compact_free_list()
    assert sorted(table) == [1 << 32 | 2, 3 << 32 | 9]
    assert 3 << 32 | 9 in table and 2 << 32 | 9 not in table
    fresh = {slot_of(new_one(table, 4, "zsmalloc")) for _ in range(8)}
    assert fresh == {1, 3, 4, 5, 6, 7, 8, 10}  # every unused slot, none taken twice


def test_locations_taken_at_once_reuse_free_slots_before_new_ones() -> None:
    table = RemoteTable()
    first = table.new_many(3, "zsmalloc", 600)
    assert len({slot_of(loc) for loc in first}) == 600 and table.count == 600
    for location in first[:5]:
        table.free(location)
    again = table.new_many(3, "zsmalloc", 10)  # 5 free slots, then the columns grow
    assert {slot_of(loc) for loc in first[:5]} <= {slot_of(loc) for loc in again}
    assert len({slot_of(loc) for loc in again}) == 10 and not set(again) & set(first)
    assert all(location in table for location in [*first[5:], *again])
    assert table.count == 605 and len(table.pool) <= 601 + 256
