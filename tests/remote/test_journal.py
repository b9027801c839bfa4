# The remote index journal: what it replays after a crash (torn tail included), what it drops,
# that compaction keeps it proportional to what is live, and what a full disk does to it.
from __future__ import annotations

from pathlib import Path

import pytest

from ramster import atomicfile
from ramster.remote import journal
from ramster.remote.journal import RECORD, REWRITE_CHUNK, Journal, JournalError, Recovered
from tests.remote.fulldisk import FullDiskOs
from tests.smalldisk import ROOT, fill_up, small_disk


def test_replay_folds_records_into_live_locations(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.keys([1], 0, "zsmalloc", [(7, 0)])
    j.holders([1], "h1:1")
    j.holders([1], "h2:1")
    j.drop(1, "h1:1")
    j.keys([2], 0, "zbud", [(7, 1)])
    j.disk(2, 42)
    j.keys([3], 5, "zsmalloc", [(9, 3)])
    j.holders([3], "h1:1")
    j.forget(3)
    j.keys([4], 0, "zsmalloc", [(7, 2)])  # never got a copy: its only copy was in RAM
    j.commit()
    with open(j.path, "ab") as f:
        f.write(RECORD.pack(2, 0, 0, 0, 0, 2, 0)[:20])  # a record torn by a crash
    again = Journal(tmp_path)
    assert again.recovered == {
        1: Recovered(0, "zsmalloc", 7, 0, {"h2:1"}),
        2: Recovered(0, "zbud", 7, 1, set(), 42),
    }
    assert again.torn == 1


def test_rewrite_keeps_the_journal_proportional_to_what_is_live(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for round_ in range(50):
        for loc in range(1, 101):
            location = round_ * 100 + loc
            j.keys([location], 0, "zsmalloc", [(1, loc)])
            j.holders([location], "h1:1")
            if round_ < 49:
                j.forget(location)
        j.commit()
    live = Journal(tmp_path).recovered
    assert len(live) == 100
    j.rewrite(live)
    j.close()
    assert j.path.stat().st_size == (100 * 2 + 1) * RECORD.size  # + the generation mark
    assert Journal(tmp_path).recovered == live


def test_a_restarted_owner_never_reuses_a_location(tmp_path: Path) -> None:
    """Locations name versions of pages (copies are sealed with them): generations handed out
    after a restart start above every one the journal saw, compacted or not."""
    from ramster.remote import RamsterLayer
    from ramster.remote.events import Heard
    from ramster.remote.membership import PeerInfo
    from ramster.zcache.codec import compress, make_zpage

    zpage = make_zpage(1, 0, compress(bytes(4096)))
    used = set()
    for _ in range(3):
        layer = RamsterLayer("a", "inc", ["b:1"], journal=Journal(tmp_path))
        layer.handle(Heard("b:1", PeerInfo("b", "x", 1 << 30, False), 0.0))
        layer.membership.peers["b:1"].synced = True
        for _ in range(5):  # the same slot again and again
            (location,) = layer.evict(0, "zsmalloc", [zpage])
            assert location not in used
            used.add(location)
            layer.forget(0, [location])
        assert layer.journal is not None
        layer.journal.close()  # a crash: no compaction
    assert len(used) == 15


def test_a_rewrite_streams_its_entries_in_pieces(tmp_path: Path) -> None:
    count = 3 * REWRITE_CHUNK // (2 * RECORD.size)  # three pieces of KEY + HOLDER records
    entries = {loc: Recovered(0, "zsmalloc", 1, loc, {"h1:1"}) for loc in range(1, count + 1)}
    j = Journal(tmp_path)
    j.rewrite(entries, high_gen=5)
    j.close()
    assert j.path.stat().st_size == (2 * count + 1) * RECORD.size
    again = Journal(tmp_path)
    assert again.recovered == entries and again.high_gen == 5 and not again.torn


def test_compaction_from_itself_keeps_the_keys_of_live_locations(tmp_path: Path) -> None:
    """A running owner's table has no keys: compaction takes them from the file, and the
    copies from the table's answer, in pieces (more records than one piece)."""
    count = 3 * REWRITE_CHUNK // (2 * RECORD.size)
    j = Journal(tmp_path)
    for location in range(1, count + 1):
        j.keys([location], 2, "zbud" if location % 2 else "zsmalloc", [(9, location)])
        j.holders([location], "h1:1")
    j.forget(5)

    def state(location: int) -> tuple[list[str], int] | None:
        # the table's view: 5 is forgotten, 7 is gone since, 8 moved to h2 and the disk
        if location in (5, 7):
            return None
        return (["h2:1"], 44) if location == 8 else (["h1:1"], 0)

    j.compact(state, high_gen=3)  # the buffered records are committed first
    j.close()
    assert j.path.stat().st_size == (2 * (count - 2) + 1 + 1) * RECORD.size
    again = Journal(tmp_path)
    assert len(again.recovered) == count - 2 and 5 not in again.recovered
    assert again.recovered[8] == Recovered(2, "zsmalloc", 9, 8, {"h2:1"}, 44)
    assert again.recovered[9] == Recovered(2, "zbud", 9, 9, {"h1:1"})
    assert again.high_gen == 3


def test_a_full_disk_keeps_records_waiting_in_order_and_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    told: list[tuple[bool, int]] = []
    j.on_unwritten = lambda waiting, records: told.append((waiting, records))
    j.keys([1, 2, 3], 0, "zsmalloc", [(7, 0), (7, 1), (7, 2)])
    j.holders([1, 2, 3], "h1:1")
    disk = FullDiskOs(room=2 * RECORD.size + 5)  # two records and a piece of the third
    monkeypatch.setattr(journal, "os", disk)
    j.commit()
    assert j.waiting == 4 and told == [(True, 4)]
    assert j.path.stat().st_size == 3 * RECORD.size  # the mark and two whole records
    j.commit()  # still full: nothing more, nothing told again
    assert j.waiting == 4 and told == [(True, 4)]
    disk.room = 1 << 20  # room again
    j.disk(2, 42)
    j.commit()
    assert j.waiting == 0 and told == [(True, 4), (False, 0)]
    assert Journal(tmp_path).recovered == {
        1: Recovered(0, "zsmalloc", 7, 0, {"h1:1"}),
        2: Recovered(0, "zsmalloc", 7, 1, {"h1:1"}, 42),
        3: Recovered(0, "zsmalloc", 7, 2, {"h1:1"}),
    }


def test_a_journal_that_cannot_be_rewritten_opens_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.keys([1, 2], 0, "zsmalloc", [(7, 0), (7, 1)])
    j.holders([1], "h1:1")
    j.holders([2], "h2:1")  # both peers named in the peers file before the disk fills
    j.close()
    monkeypatch.setattr(atomicfile, "os", FullDiskOs())
    again = Journal(tmp_path)  # its rewrite at open fails: kept, and appended to
    assert again.not_compacted and not list(tmp_path.glob("*.tmp"))
    again.holders([1], "h2:1")
    again.commit()
    again.compact(lambda location: (["h1:1", "h2:1"], 0), 1)  # fails too: no harm done
    again.close()
    monkeypatch.undo()
    assert Journal(tmp_path).recovered == {
        1: Recovered(0, "zsmalloc", 7, 0, {"h1:1", "h2:1"}),
        2: Recovered(0, "zsmalloc", 7, 1, {"h2:1"}),
    }
    with pytest.raises(JournalError, match="cannot write"):  # a new journal must be written
        monkeypatch.setattr(atomicfile, "os", FullDiskOs())
        Journal(tmp_path / "new")


@ROOT
def test_a_journal_keeps_room_to_append_on_a_disk_that_fills_up(tmp_path: Path) -> None:
    """Records appended after the disk filled up land in the room the file keeps past its end
    (a real tmpfs: the fake full disk above refuses every write), so none waits, and all of
    them are found again."""
    with small_disk(tmp_path / "disk", "12m") as disk:
        j = Journal(disk)
        j.slot("h1:1")  # the peers file names the peer before the disk fills
        fill_up(disk / "filler")
        locations = list(range(1, 20_001))
        j.keys(locations, 0, "zsmalloc", [(7, i) for i in range(len(locations))])
        j.holders(locations, "h1:1")
        j.commit()
        assert j.waiting == 0 and not j.unwritten
        j.close()
        again = Journal(disk)  # its rewrite finds no room: kept as it is
        assert again.not_compacted
        assert again.recovered == {
            location: Recovered(0, "zsmalloc", 7, i, {"h1:1"})
            for i, location in enumerate(locations)
        }
        again.close()
