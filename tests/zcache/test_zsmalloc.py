# zsmalloc: no arena frame is asked for while a class owns a free slot, compaction never takes a
# frame, runs only when it frees some (whole zspages, or the empty top frames of one it packs),
# and the reaper compacts before it evicts.
from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.zcache import PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.arena import Arena
from ramster.zcache.backing import BackingFile
from ramster.zcache.zsmalloc import OWNED, SIZES, SLOTS, WORDS, Zsmalloc, class_layout

Z48 = bytes(48)  # size class 48: 256 slots in 3 frames, 170 of them in the first 2


def moves(zs: Zsmalloc) -> list[tuple[int, int]]:
    moved: list[tuple[int, int]] = []
    zs.compact(lambda old, new, zpage: moved.append((old, new)))
    return moved


def two_zspages(frames: int, keep_in_first: int) -> tuple[Zsmalloc, list[int]]:
    """A full 3-frame zspage cut down to `keep_in_first` zpages, and a 2-frame one of 170."""
    assert class_layout(48) == (3, 256)
    zs = Zsmalloc(Arena(frames))
    first = [zs.alloc(Z48, 1) for _ in range(256)]
    second = [zs.alloc(Z48, 2) for _ in range(170)]
    assert zs.frames == 5
    for handle in first[: 256 - keep_in_first]:
        zs.free(handle)
    return zs, second


def test_alloc_uses_free_slots_in_owned_frames_before_asking_the_arena() -> None:
    zs, _ = two_zspages(frames=5, keep_in_first=126)  # the arena is full
    handles = [zs.alloc(Z48, 3) for _ in range(130)]
    assert min(handles) >= 0, "a class with 130 free slots in its frames refused a zpage"
    assert zs.frames == 5
    assert zs.alloc(Z48, 4) == -1  # now there really is no room


def test_compaction_never_takes_a_frame_and_gives_back_empty_top_frames() -> None:
    zs, _ = two_zspages(frames=5, keep_in_first=100)  # the arena is full
    assert zs.compactable == 0  # 156 free slots: less than a zspage
    moved = moves(zs)  # slots 170-255 of the first zspage move down, into its first 2 frames
    assert len(moved) == 86 and zs.frames == 4
    assert all(new >> 8 == old >> 8 and new & 0xFF < 170 for old, new in moved)
    assert moves(zs) == [] and zs.frames == 4, "compaction that frees nothing moves nothing"


def test_compaction_runs_when_a_zspage_of_slots_is_wasted() -> None:
    zs, second = two_zspages(frames=8, keep_in_first=100)
    for handle in second[:100]:  # 156 + 100 free owned slots: a whole zspage
        zs.free(handle)
    assert zs.compactable == 1
    before = zs.frames
    moved = moves(zs)  # the second zspage's 70 into the first, whose top 86 then move down
    assert len(moved) == 156 and zs.frames == before - 3
    assert zs.compactable == 0


def check_accounting(zs: Zsmalloc) -> None:
    waste = [0] * len(SIZES)  # free owned slots per class, the hot zspage's left out
    for zid in zs.lru:
        c = zs.cls[zid]
        used = sum(w << 64 * i for i, w in enumerate(zs.used[zid * WORDS : (zid + 1) * WORDS]))
        assert bin(used).count("1") == zs.inuse[zid]
        assert used < 1 << OWNED[c][zs.nframes[zid]], "a slot outside owned frames"
        if zs.hot[c] != zid:
            waste[c] += OWNED[c][zs.nframes[zid]] - zs.inuse[zid]
    assert list(zs.waste) == waste
    assert zs.compactable == sum(w >= s for w, s in zip(waste, SLOTS, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(min_value=1, max_value=12),
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "free", "compact"]), st.integers(18, 700)),
        max_size=300,
    ),
)
def test_random_churn_keeps_room_and_accounting(frames: int, ops: list[tuple[str, int]]) -> None:
    zs = Zsmalloc(Arena(frames))
    live: dict[int, bytes] = {}
    for n, (op, size) in enumerate(ops):
        if op == "alloc":
            zpage = bytes([n % 256]) * size
            handle = zs.alloc(zpage, n + 1)
            if handle < 0:
                c = next(i for i, s in enumerate(SIZES) if s >= size)
                assert zs.waste[c] == 0, "refused with a free slot in the class's frames"
                assert not zs.hot[c] or zs.inuse[zs.hot[c]] == OWNED[c][zs.nframes[zs.hot[c]]]
            else:
                live[handle] = zpage
        elif op == "free" and live:
            handle = list(live)[size % len(live)]
            zs.free(handle)
            del live[handle]
        elif op == "compact":
            before = zs.frames

            def moved(old: int, new: int, zpage: bytes | memoryview) -> None:
                live[new] = live.pop(old)

            freed = zs.compact(moved)
            assert freed >= 0 and zs.frames == before - freed
            assert zs.compactable == 0
        check_accounting(zs)
    for handle, zpage in live.items():
        assert bytes(zs.read(handle))[: len(zpage)] == zpage


def page(seed: int, noise: int) -> bytes:
    """A page that compresses to about `noise` bytes."""
    return random.Random(seed).randbytes(noise) + bytes(4096 - noise)


def test_reaper_compacts_churn_instead_of_evicting(tmp_path: Path) -> None:
    backing = BackingFile(tmp_path / "b.dat")
    cache = ZCache(ZCacheConfig(pool_limit_frames=300), evictor=backing)
    pool = cache.create_pool(PoolKind.PERSISTENT, "zsmalloc")
    big = {(0, i): page(i, 1000) for i in range(1000)}  # about 256 frames of 1 KiB zpages
    cache.put_batch(pool, list(big), list(big.values()))
    for key in list(big)[::3] + list(big)[1::3]:  # holes in every zspage, no frame freed
        cache.flush_page(pool, *key)
        del big[key]
    small = {(1, i): page(i, 300) for i in range(2000)}  # another size class: 150 frames
    results = cache.put_batch(pool, list(small), list(small.values()))
    assert PutResult.REFUSED_NO_ROOM not in results
    assert cache.reaper.stats.reclaim_passes > 0
    assert cache.stats.compacted_frames > 100
    assert cache.reaper.stats.evicted_persistent == 0, "churn must be cured by compaction"
    assert cache.get_batch(pool, list(big)) == list(big.values())
    assert cache.get_batch(pool, list(small)) == list(small.values())
    cache.verify()
