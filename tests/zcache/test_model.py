# Property-based model test: any sequence of tmem operations on the engine agrees with a plain
# dict, for both allocators and both pool kinds, while the engine's invariants hold throughout.
#
# Persistent pages that were accepted and not flushed must come back exactly; ephemeral pages may
# vanish but never come back wrong.  A tiny arena makes reclaim and "no room" refusals part of the
# story; with a backing file behind it, reclaim writes persistent pages back, gets bring them
# home, and a restart (graceful or a crash) keeps exactly the pages that were on disk.
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ramster.bench.corpus import load_corpus
from ramster.zcache import PAGE_SIZE, PoolKind, ZCache, ZCacheConfig
from ramster.zcache.backing import BackingFile
from ramster.zcache.handles import EVICTED, KIND_SHIFT
from tests.conftest import DATA

REAL = load_corpus(DATA / "sample.pages")
PAGES = [
    *REAL,
    bytes(PAGE_SIZE),
    b"\x01\x02\x03\x04\x05\x06\x07\x08" * (PAGE_SIZE // 8),
    os.urandom(PAGE_SIZE),
]
OIDS = st.sampled_from([0, 1, 2, (1 << 64) - 1])
INDICES = st.integers(min_value=0, max_value=300)
PAGE_NO = st.integers(min_value=0, max_value=len(PAGES) - 1)


def machine(
    allocator: str, kind: PoolKind, store_raw: bool, backed: bool
) -> type[RuleBasedStateMachine]:
    class TmemModel(RuleBasedStateMachine):
        @initialize(frames=st.integers(min_value=1, max_value=24))
        def start(self, frames: int) -> None:
            self.config = ZCacheConfig(capacity_frames=frames, store_incompressible_raw=store_raw)
            self.dir = Path(tempfile.mkdtemp(prefix="ramster-model-"))
            self.backing = BackingFile(self.dir / "backing.dat") if backed else None
            self.cache = ZCache(self.config, evictor=self.backing)
            self.pool = self.cache.create_pool(kind, allocator)
            self.model: dict[tuple[int, int], bytes] = {}

        def teardown(self) -> None:
            if hasattr(self, "cache"):
                self.cache.close()
                if self.backing is not None:
                    self.backing.close()
                shutil.rmtree(self.dir, ignore_errors=True)

        @rule(oid=OIDS, index=INDICES, page_no=PAGE_NO)
        def put(self, oid: int, index: int, page_no: int) -> None:
            page = PAGES[page_no]
            result = self.cache.put(self.pool, oid, index, page)
            if result.refused:
                self.model.pop((oid, index), None)
            else:
                self.model[(oid, index)] = page

        @rule(oid=OIDS, start=INDICES, page_nos=st.lists(PAGE_NO, min_size=1, max_size=12))
        def put_batch(self, oid: int, start: int, page_nos: list[int]) -> None:
            keys = [(oid, start + i // 2) for i in range(len(page_nos))]  # with repeats
            pages = [PAGES[n] for n in page_nos]
            results = self.cache.put_batch(self.pool, keys, pages)
            for key, page, result in zip(keys, pages, results, strict=True):
                if result.refused:
                    self.model.pop(key, None)
                else:
                    self.model[key] = page

        @rule(oid=OIDS, index=INDICES, exclusive=st.booleans())
        def get(self, oid: int, index: int, exclusive: bool) -> None:
            got = self.cache.get(self.pool, oid, index, exclusive=exclusive)
            expected = self.model.get((oid, index))
            if kind is PoolKind.PERSISTENT:
                assert got == expected
            else:
                assert got is None or got == expected
            if exclusive or kind is PoolKind.EPHEMERAL:
                self.model.pop((oid, index), None)

        @rule(oid=OIDS, index=INDICES)
        def flush_page(self, oid: int, index: int) -> None:
            had = self.cache.flush_page(self.pool, oid, index)
            assert had == ((oid, index) in self.model) or kind is PoolKind.EPHEMERAL
            self.model.pop((oid, index), None)

        @rule(oid=OIDS)
        def flush_object(self, oid: int) -> None:
            self.cache.flush_object(self.pool, oid)
            for key in [k for k in self.model if k[0] == oid]:
                del self.model[key]

        @rule()
        def compact(self) -> None:
            self.cache.compact()

        @rule()
        def destroy_and_recreate(self) -> None:
            self.cache.destroy_pool(self.pool)
            self.pool = self.cache.create_pool(kind, allocator)
            self.model.clear()
            assert self.cache.frames == 0

        @rule(crash=st.booleans())
        def restart(self, crash: bool) -> None:
            """Stop and start again on the same backing file: only pages on disk survive."""
            if self.backing is None:
                return
            index = self.cache.pool(self.pool).index
            on_disk = {(o, i) for o, i, h in index.items() if h >> KIND_SHIFT == EVICTED}
            self.cache.close()
            if crash:
                os.close(self.backing.fd)
            else:
                self.backing.close()
            self.backing = BackingFile(self.dir / "backing.dat")
            self.cache = ZCache(self.config, evictor=self.backing)
            assert self.backing.stats.was_clean is not crash
            self.model = {k: v for k, v in self.model.items() if k in on_disk}
            if self.pool not in self.cache.pools:  # nothing was on disk
                assert not on_disk
                self.pool = self.cache.create_pool(kind, allocator)

        @invariant()
        def consistent(self) -> None:
            if not hasattr(self, "cache"):
                return
            self.cache.verify()
            if kind is PoolKind.PERSISTENT:
                assert self.cache.stored_pages == len(self.model)

    TmemModel.__name__ = f"TmemModel_{allocator}_{kind.value}{'_backed' * backed}"
    return TmemModel


CASES = [
    (allocator, kind, raw, backed)
    for allocator in ("zbud", "zsmalloc")
    for kind in PoolKind
    for raw in (False, True)
    for backed in (False, True)
    if not (backed and kind is PoolKind.EPHEMERAL and raw)
]


@pytest.mark.parametrize(("allocator", "kind", "store_raw", "backed"), CASES)
def test_engine_matches_dict_model(
    allocator: str, kind: PoolKind, store_raw: bool, backed: bool
) -> None:
    test_case = machine(allocator, kind, store_raw, backed).TestCase
    test_case.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
    test_case("runTest").runTest()
