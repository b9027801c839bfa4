# Reclaim in steps (node/reclaimer.py): the put that hits the pool limit frees one step, the
# Reclaimer frees the rest down to the low mark a step per loop turn, and no page is lost; stopped,
# the engine reclaims in one go again.
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node import reclaimer
from node.reclaimer import Reclaimer
from ramster.zcache import PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile

LIMIT, LOW, STEP = 2048, 1024, 64  # frames


def engine_at_its_limit(tmp_path: Path) -> ZCache:
    backing = BackingFile(tmp_path / "b.dat")
    return ZCache(ZCacheConfig(pool_limit_frames=LIMIT, reclaim_to=LOW / LIMIT), evictor=backing)


def pages_for(compressible: list[bytes], start: int, count: int) -> list[bytes]:
    return [compressible[i % len(compressible)] for i in range(start, start + count)]


async def test_a_full_pool_is_reclaimed_a_step_per_loop_turn(
    tmp_path: Path, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reclaimer, "RECLAIM_STEP_FRAMES", STEP)
    engine = engine_at_its_limit(tmp_path)
    pool = engine.create_pool(PoolKind.PERSISTENT)
    turns = [0]

    async def step() -> None:
        turns[0] += 1
        await asyncio.sleep(0)

    stepper = Reclaimer(engine, step)
    stepper.start()
    n = 0
    while engine.reaper.stats.reclaim_passes == 0:  # fill to the limit, a batch at a time
        keys = [(0, i) for i in range(n, n + 256)]
        assert PutResult.REFUSED_NO_ROOM not in engine.put_batch(
            pool, keys, pages_for(compressible_pages, n, 256)
        )
        n += 256
    assert engine.frames > LIMIT - 2 * STEP  # the put freed a step, not down to the low mark
    for _ in range(10 * LIMIT // STEP):
        await asyncio.sleep(0)
        if engine.frames <= LOW:
            break
    assert engine.frames <= LOW and turns[0] >= (LIMIT - LOW) // STEP - 2
    assert engine.reaper.stats.reclaim_passes >= (LIMIT - LOW) // STEP - 2
    everything = [(0, i) for i in range(n)]
    assert engine.get_batch(pool, everything) == pages_for(compressible_pages, 0, n)
    await stepper.stop()
    passes = engine.reaper.stats.reclaim_passes
    more = [(1, i) for i in range(4 * LIMIT)]  # over the limit again: reclaim in one go
    engine.put_batch(pool, more, pages_for(compressible_pages, 0, len(more)))
    assert engine.reaper.stats.reclaim_passes - passes <= len(more) // (LIMIT - LOW) + 2
    engine.close()
