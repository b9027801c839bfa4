# The backing file: write-back, slot reuse, restart recovery, and torn or corrupted records.
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ramster.zcache import CorruptPage, PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache import backing as backing_module
from ramster.zcache.backing import BLOCK, ROOM_STEP, BackingFile, BackingFileError
from ramster.zcache.cache import SAVE_AHEAD
from ramster.zcache.codec import compress, make_zpage
from tests.smalldisk import ROOT, fill_up, small_disk

PAGE = 4096

P = PoolKind.PERSISTENT


def fill(path: Path, pages: list[bytes], frames: int = 12) -> tuple[ZCache, BackingFile, int]:
    """A zcache whose limit pushes most of `pages` (keys (5, i)) into a backing file."""
    backing = BackingFile(path)
    cache = ZCache(ZCacheConfig(pool_limit_frames=frames), evictor=backing)
    pool = cache.create_pool(P, "zbud")
    results = cache.put_batch(pool, [(5, i) for i in range(len(pages))], pages)
    assert not any(r.refused for r in results)
    return cache, backing, pool


def reopen(path: Path) -> tuple[ZCache, BackingFile]:
    backing = BackingFile(path)
    return ZCache(ZCacheConfig(pool_limit_frames=12), evictor=backing), backing


def on_disk(cache: ZCache, pool: int) -> dict[int, bytes]:
    """index -> page of every key the restarted zcache knows (all of them were on disk)."""
    keys = [(5, i) for _, i, _ in cache.pool(pool).index.items()]
    pages = cache.get_batch(pool, keys)
    assert not any(isinstance(p, CorruptPage) for p in pages)
    return {i: p for (_, i), p in zip(keys, pages, strict=True) if isinstance(p, bytes)}


def test_graceful_restart_finds_written_back_pages(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    written = cache.evicted_pages
    assert written > 40
    cache.close()
    backing.close()
    cache2, backing2 = reopen(path)
    assert backing2.stats.was_clean and backing2.stats.torn == 0
    assert backing2.stats.recovered == written
    assert pool in cache2.pools
    found = on_disk(cache2, pool)
    assert len(found) == written
    assert all(page == compressible_pages[i] for i, page in found.items())
    cache2.verify()


def test_crash_restart_recovers_completed_writes(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    written = cache.evicted_pages
    os.close(backing.fd)  # the process dies: no clean close, no fsync
    cache2, backing2 = reopen(path)
    assert not backing2.stats.was_clean
    found = on_disk(cache2, pool)
    assert len(found) == written
    assert all(page == compressible_pages[i] for i, page in found.items())


def test_flushed_pages_never_come_back(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    flushed = [i for _, i, _ in cache.pool(pool).index.items()][:20]
    for i in flushed:
        cache.flush_page(pool, 5, i)
    cache.put(pool, 5, flushed[-1], compressible_pages[0])  # overwrite, lands in RAM
    os.close(backing.fd)
    cache2, _ = reopen(path)
    found = on_disk(cache2, pool)
    assert not set(found) & set(flushed)


def test_torn_last_write_is_detected(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    written = cache.evicted_pages
    os.close(backing.fd)
    size = path.stat().st_size
    os.truncate(path, size - BLOCK // 2)  # the last record is cut short
    cache2, backing2 = reopen(path)
    found = on_disk(cache2, pool)
    assert backing2.stats.torn == 1
    assert len(found) == written - 1
    assert all(page == compressible_pages[i] for i, page in found.items())


@pytest.mark.parametrize("where", [0, 8, 24, 30, 60, 300])  # magic, seq, zpage header, payload
def test_corrupted_record_is_never_returned(
    tmp_path: Path, compressible_pages: list[bytes], where: int
) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    written = cache.evicted_pages
    backing.close()
    first = 8 * BLOCK  # the first record follows the superblock
    with open(path, "r+b") as f:
        f.seek(first + where)
        byte = f.read(1)
        f.seek(first + where)
        f.write(bytes([byte[0] ^ 0x5A]))
    cache2, backing2 = reopen(path)
    if where < 42:  # a damaged header: the record's key is unknown, it is dropped as torn
        found = on_disk(cache2, pool)
        assert backing2.stats.torn == (1 if where else 0)  # no magic: not even seen
    else:  # a damaged payload: the key is known, and a get of it reports the damage
        keys = [(5, i) for _, i, _ in cache2.pool(pool).index.items()]
        pages = cache2.get_batch(pool, keys)
        assert sum(isinstance(p, CorruptPage) for p in pages) == backing2.stats.damaged == 1
        found = {i: p for (_, i), p in zip(keys, pages, strict=True) if isinstance(p, bytes)}
    assert len(found) == written - 1
    assert all(page == compressible_pages[i] for i, page in found.items())


def test_corruption_after_open_raises(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    _, index, handle = next(item for item in cache.pool(pool).index.items() if item[2] >> 56 == 4)
    location = handle & ((1 << 56) - 1)
    os.pwrite(backing.fd, b"\xff" * 8, location * BLOCK + 40)
    with pytest.raises(CorruptPage):
        cache.get(pool, 5, index)


def test_free_space_is_reused(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    pool_id = 3
    zpages = [make_zpage(1, i, page[:2000]) for i, page in enumerate(compressible_pages[:50])]
    locations = backing.evict(pool_id, "zsmalloc", zpages)
    size = backing.size_bytes
    for location in locations:
        backing.forget(pool_id, [location])
    again = backing.evict(pool_id, "zsmalloc", zpages)
    assert backing.size_bytes == size
    assert sorted(again) == sorted(locations)
    assert [backing.load(pool_id, loc) for loc in again] == zpages


def test_not_a_backing_file(tmp_path: Path) -> None:
    path = tmp_path / "other.dat"
    path.write_bytes(b"hello world" * 100)
    with pytest.raises(BackingFileError, match="not a RAMster backing file"):
        BackingFile(path)
    assert path.read_bytes() == b"hello world" * 100
    with pytest.raises(BackingFileError, match="cannot open"):
        BackingFile(tmp_path / "missing-dir" / "b.dat")


def test_restart_files_recovered_pages_in_the_pools_given(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    path = tmp_path / "backing.dat"
    cache, backing, pool = fill(path, compressible_pages)
    other = cache.create_pool(P, "zbud")
    cache.put_batch(other, [(5, i) for i in range(88)], compressible_pages)
    written = {p: cache.pool(p).evicted for p in (pool, other)}
    assert all(written.values())
    cache.close()
    backing.close()
    backing2 = BackingFile(path)
    specs = [(pool, P, "zsmalloc", True), (9, PoolKind.EPHEMERAL, "zbud", None)]
    cache2 = ZCache(ZCacheConfig(pool_limit_frames=12), evictor=backing2, pools=specs)
    restored = cache2.pool(pool)
    assert (restored.allocator, restored.store_raw) == ("zsmalloc", True), "not reinvented"
    invented = cache2.pool(other)  # not in `pools`: recreated from what the evictor knows
    assert (invented.kind, invented.allocator) == (P, "zbud")
    assert cache2.pool(9).index.count == 0
    assert {p: cache2.pool(p).evicted for p in (pool, other)} == written
    assert len(on_disk(cache2, pool)) == written[pool]
    assert all(page == compressible_pages[i] for i, page in on_disk(cache2, other).items())
    assert cache2.next_pool_id == 10
    cache2.verify()


def mixed_pages(sample_pages: list[bytes]) -> list[bytes]:
    """Compressible, incompressible and same-filled pages."""
    return [*sample_pages, bytes(4096), b"\x07" * 4096, *sample_pages[::7]]


def test_write_back_all_keeps_every_persistent_page_across_a_restart(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    path = tmp_path / "backing.dat"
    backing = BackingFile(path)
    cache = ZCache(ZCacheConfig(pool_limit_frames=80), evictor=backing)
    raw = cache.create_pool(P, "zsmalloc", store_raw=True)
    plain = cache.create_pool(P, "zbud")
    eph = cache.create_pool(PoolKind.EPHEMERAL, "zbud")
    pages = mixed_pages(sample_pages)
    keys = [(3, i) for i in range(len(pages))]
    kept = {}
    for pool in (plain, raw):  # reclaim writes some of plain back already
        results = cache.put_batch(pool, keys, pages)
        kept[pool] = {k: p for k, p, r in zip(keys, pages, results, strict=True) if not r.refused}
    cache.put_batch(eph, keys[:20], pages[:20])
    eph_frames = cache.pool(eph).zalloc.frames
    in_ram = sum(cache.pool(p).index.count - cache.pool(p).evicted for p in (raw, plain))
    assert cache.same.pages and cache.pool(raw).raw.zpages and cache.pool(plain).evicted
    assert cache.write_back_all() == (in_ram, 0)
    assert cache.evicted_pages == backing.live == sum(len(k) for k in kept.values())
    assert cache.frames == eph_frames and cache.pool(eph).index.count
    assert cache.same.pages == 0
    cache.verify()
    assert cache.write_back_all() == (0, 0)
    cache.close()
    backing.close()
    backing2 = BackingFile(path)
    specs = [
        (raw, P, "zsmalloc", True),
        (plain, P, "zbud", None),
        (eph, PoolKind.EPHEMERAL, "zbud", None),
    ]
    cache2 = ZCache(ZCacheConfig(pool_limit_frames=80), evictor=backing2, pools=specs)
    for pool, expected in kept.items():
        assert cache2.pool(pool).index.count == len(expected)
        got = cache2.get_batch(pool, list(expected))
        assert got == list(expected.values())
    assert cache2.pool(eph).index.count == 0
    cache2.verify()


def test_write_back_all_keeps_refused_pages_in_ram(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat", limit_bytes=32 * 1024)
    cache = ZCache(ZCacheConfig(pool_limit_frames=256), evictor=backing)
    pool = cache.create_pool(P, store_raw=True)
    pages = mixed_pages(sample_pages)
    keys = [(0, i) for i in range(len(pages))]
    assert not any(r.refused for r in cache.put_batch(pool, keys, pages))
    taken, refused = cache.write_back_all()
    assert taken == backing.live > 0 and refused > 0
    assert taken + refused == len(pages)
    assert cache.evicted_pages == taken
    assert cache.get_batch(pool, keys) == pages
    cache.verify()
    assert ZCache(ZCacheConfig(pool_limit_frames=8)).write_back_all() == (0, 0)


def test_a_batch_naming_a_written_back_key_twice_reads_it_twice(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """The first read marks the page, the second brings it home (there is room), which frees
    its disk record: the third must read it where it is now, not from the disk block it left
    (found by the model test: CorruptPage 'backing file holds no record at block N')."""
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=40), evictor=backing)
    pool = cache.create_pool(P, "zbud")
    keys = [(5, i) for i in range(4)]
    cache.put_batch(pool, keys, compressible_pages[:4])
    assert cache.write_back_all() == (4, 0)
    got = cache.get_batch(pool, [keys[1], keys[2], keys[1], keys[1]])
    assert got == [compressible_pages[1], compressible_pages[2], *[compressible_pages[1]] * 2]
    assert cache.stats.promoted == 1 and backing.live == 3  # keys[2] was read once
    cache.verify()


class SmallDisk:
    """The os module for a backing file on a disk of `size` bytes: allocation and writes past
    it fail with ENOSPC."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.posix_fallocate(fd, offset, length)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)


def saving(path: Path, disk: int, monkeypatch: pytest.MonkeyPatch) -> ZCache:
    """A zcache of room for 400 frames whose backing file sits on a disk of `disk` bytes and
    keeps room to save RAM, as a node's does."""
    small = SmallDisk(disk)
    monkeypatch.setattr(backing_module, "os", small)
    backing = BackingFile(path)
    cache = ZCache(ZCacheConfig(pool_limit_frames=400), evictor=backing)
    cache.save_room = backing.cover
    return cache


def test_a_disk_that_cannot_save_ram_refuses_puts_and_a_stop_saves_every_page(
    tmp_path: Path, sample_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAM has room for 400 frames, the disk for ~250 raw pages: puts are refused for no room
    once the disk could not save what RAM holds, and write_back_all then saves every page."""
    cache = saving(tmp_path / "b.dat", 250 * 9 * BLOCK, monkeypatch)
    pool = cache.create_pool(P, store_raw=True)
    ephemeral = cache.create_pool(PoolKind.EPHEMERAL)
    pages = mixed_pages(sample_pages)
    kept: dict[tuple[int, int], bytes] = {}
    for batch in range(20):
        keys = [(batch, i) for i in range(len(pages))]
        results = cache.put_batch(pool, keys, pages)
        kept |= {k: p for k, p, r in zip(keys, pages, results, strict=True) if not r.refused}
    # pages of an ephemeral pool are not saved at a stop: no room is asked for them
    assert PutResult.REFUSED_NO_ROOM not in cache.put_batch(ephemeral, keys, pages)
    assert 0 < len(kept) < 20 * len(pages)
    assert cache.stats.outcomes[PutResult.REFUSED_NO_ROOM] == 20 * len(pages) - len(kept)
    in_ram = len(kept) - cache.evicted_pages
    assert in_ram > 100 and cache.write_back_all() == (in_ram, 0)
    cache.close()
    assert isinstance(cache.evictor, BackingFile)
    cache.evictor.close()
    monkeypatch.undo()
    again = BackingFile(tmp_path / "b.dat")
    assert again.stats.recovered == len(kept)
    cache2 = ZCache(ZCacheConfig(pool_limit_frames=400), evictor=again)
    assert cache2.get_batch(pool, list(kept)) == list(kept.values())


def test_room_to_save_grows_in_steps_stays_within_the_limit_and_goes_back_at_close(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    backing = BackingFile(tmp_path / "b.dat", limit_bytes=ROOM_STEP * BLOCK + 8 * PAGE)
    assert backing.room_bytes == 0 and backing.cover(0, 0)
    assert backing.cover(10, 2)  # 10 pages in 2 frames: a step's room
    assert backing.room_bytes == ROOM_STEP * BLOCK
    assert os.stat(tmp_path / "b.dat").st_blocks * 512 >= ROOM_STEP * BLOCK
    assert backing.cover(ROOM_STEP // 10, ROOM_STEP // 10)  # 10.05 blocks each: past the step
    assert not backing.cover(ROOM_STEP, ROOM_STEP)  # past the file's limit
    # write-back takes the room as it goes, and a record in it is found again
    zpage = make_zpage(1, 2, compressible_pages[0][:1000])
    (location,) = backing.evict(3, "zbud", [zpage])
    assert location and backing.room_bytes < ROOM_STEP * BLOCK
    backing.close()
    assert os.stat(tmp_path / "b.dat").st_size == (location + 3) * BLOCK  # the room went back
    again = BackingFile(tmp_path / "b.dat")
    assert again.stats.recovered == 1 and again.room_bytes == 0
    again.close()


def test_room_to_save_is_asked_ahead_of_need_and_then_just_for_the_batch(
    sample_pages: list[bytes],
) -> None:
    asked: list[tuple[int, int]] = []
    answers = iter([True, False, True, False, False])
    cache = ZCache(ZCacheConfig(pool_limit_frames=400))
    cache.save_room = lambda pages, frames: asked.append((pages, frames)) or next(answers)
    pool, pages = cache.create_pool(P), sample_pages[:40]

    def put(oid: int) -> list[PutResult]:
        return cache.put_batch(pool, [(oid, i) for i in range(40)], pages)

    assert not any(r.refused for r in put(0))
    assert asked == [(40 + SAVE_AHEAD, 40 + SAVE_AHEAD)]  # ahead: no question for a while
    for oid in range(1, SAVE_AHEAD // 40 + 1):
        assert not any(r.refused for r in put(oid))
    assert len(asked) == 1
    held, frames = cache.pool(pool).index.count, cache.pool(pool).zalloc.frames
    assert not any(r.refused for r in put(100))  # not that much ahead: just the batch
    ahead = 40 + SAVE_AHEAD
    assert asked[1:] == [(held + ahead, frames + ahead), (held + 40, frames + 40)]
    assert all(r is PutResult.REFUSED_NO_ROOM for r in put(101))
    assert cache.pool(pool).index.count == held + 40  # nothing of the refused batch kept


def test_a_page_is_not_brought_home_where_a_stop_could_not_save_it(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """A second get brings an evicted page back to RAM only if the disk could save it."""
    pages = compressible_pages[:60]
    cache, _, pool = fill(tmp_path / "b.dat", pages)
    room = [False]
    cache.save_room = lambda pages, frames: room[0]
    assert cache.flush_pages(pool, [(5, i) for i in range(40, 60)]) == 20  # room in RAM
    keys, evicted = [(5, i) for i in range(40)], cache.pool(pool).evicted
    for _ in range(2):
        assert cache.get_batch(pool, keys) == pages[:40]
    assert cache.pool(pool).evicted == evicted and cache.stats.promoted == 0
    room[0] = True
    assert cache.get_batch(pool, keys) == pages[:40]
    assert cache.stats.promoted > 0


@ROOT
def test_a_batch_that_fills_the_disk_keeps_the_records_written_whole_and_no_torn_one(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """A batch's adjacent records go to disk in one write; when the disk fills up in the
    middle of it, the records written whole are taken, the rest refused, and the one written
    in part is never found again (its magic is overwritten)."""
    with small_disk(tmp_path / "disk", "1M") as disk:
        backing = BackingFile(disk / "backing.dat")
        filler = disk / "filler"
        fill_up(filler)
        os.truncate(filler, filler.stat().st_size - 4 * PAGE)  # 16 KiB left
        zpages = [
            make_zpage(5, i, compress(page)) for i, page in enumerate(compressible_pages[:32])
        ]
        locations = backing.evict(1, "zbud", zpages)
        taken = [i for i, at in enumerate(locations) if at]
        assert taken == list(range(len(taken))) and 0 < len(taken) < len(zpages)
        assert backing.stats.write_errors == len(zpages) - len(taken)
        assert backing.live == len(taken)
        assert [backing.load(1, locations[i]) for i in taken] == [zpages[i] for i in taken]
        backing.close()
        again = BackingFile(disk / "backing.dat")
        assert (again.stats.recovered, again.stats.damaged, again.stats.torn) == (len(taken), 0, 0)
        again.close()
