# Property-based model test: any sequence of tmem operations on the engine agrees with a plain
# dict, for both allocators and both pool kinds, while the engine's invariants hold throughout.
#
# Persistent pages that were accepted and not flushed must come back exactly; ephemeral pages may
# vanish but never come back wrong.  A tiny arena makes reclaim and "no room" refusals part of the
# story; with a backing file behind it, reclaim writes persistent pages back, gets bring them
# home, and a restart (graceful or a crash) keeps exactly the pages that were on disk.  The second
# machine runs a persistent and an ephemeral pool side by side (allocators and store-raw drawn),
# so reclaim, compaction and write_back_all choose between pools, and checks that the backing
# file holds exactly one live record per evicted page.
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ramster.bench.corpus import load_corpus
from ramster.zcache import ALLOCATORS, PAGE_SIZE, PoolKind, ZCache, ZCacheConfig
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
            self.config = ZCacheConfig(pool_limit_frames=frames, store_incompressible_raw=store_raw)
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

        @rule(oid=OIDS, start=INDICES, count=st.integers(min_value=0, max_value=12))
        def flush_pages(self, oid: int, start: int, count: int) -> None:
            keys = [(oid, start + i // 2) for i in range(count)]  # with repeats
            had = len({k for k in keys if k in self.model})
            flushed = self.cache.flush_pages(self.pool, keys)
            assert flushed == had or kind is PoolKind.EPHEMERAL
            for key in keys:
                self.model.pop(key, None)

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
            on_disk = {(o, i) for o, i, h in index.items() if h >> KIND_SHIFT >= EVICTED}
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


KEYS = st.tuples(OIDS, INDICES)
# Half of the pages drawn are the corpus pages (spread thinly over many size classes), half fill
# two classes of one-frame zspages, so holes add up to a whole zspage and compaction has work.
MIXED = [
    *PAGES,
    *(random.Random(i).randbytes(n) + bytes(PAGE_SIZE - n) for n in (620, 960) for i in range(8)),
]
MIXED_NO = st.one_of(PAGE_NO, st.integers(min_value=len(PAGES), max_value=len(MIXED) - 1))
POOL = st.sampled_from([PoolKind.PERSISTENT, PoolKind.EPHEMERAL])
STORE_RAW = st.sampled_from([None, False, True])


class TwoPoolModel(RuleBasedStateMachine):
    @initialize(
        frames=st.integers(min_value=2, max_value=20),
        allocators=st.tuples(st.sampled_from(ALLOCATORS), st.sampled_from(ALLOCATORS)),
        store_raw=st.tuples(STORE_RAW, STORE_RAW),
        raw_default=st.booleans(),
    )
    def start(
        self,
        frames: int,
        allocators: tuple[str, str],
        store_raw: tuple[bool | None, bool | None],
        raw_default: bool,
    ) -> None:
        config = ZCacheConfig(pool_limit_frames=frames, store_incompressible_raw=raw_default)
        self.dir = Path(tempfile.mkdtemp(prefix="ramster-model-"))
        self.backing = BackingFile(self.dir / "backing.dat")
        self.cache = ZCache(config, evictor=self.backing)
        self.pools = {
            kind: self.cache.create_pool(kind, allocator, store_raw=raw)
            for kind, allocator, raw in zip(PoolKind, allocators, store_raw, strict=True)
        }
        self.model: dict[PoolKind, dict[tuple[int, int], bytes]] = {k: {} for k in PoolKind}

    def teardown(self) -> None:
        if hasattr(self, "cache"):
            self.cache.close()
            self.backing.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def check_got(self, kind: PoolKind, key: tuple[int, int], got: object, remove: bool) -> None:
        expected = self.model[kind].get(key)
        if kind is PoolKind.PERSISTENT:
            assert got == expected, f"persistent page {key} came back wrong or was lost"
        else:
            assert got is None or got == expected, f"ephemeral page {key} came back wrong"
        if remove or kind is PoolKind.EPHEMERAL:
            self.model[kind].pop(key, None)

    @rule(kind=POOL, key=KEYS, page_no=MIXED_NO)
    def put(self, kind: PoolKind, key: tuple[int, int], page_no: int) -> None:
        self.put_batch(kind, key[0], key[1], [page_no])

    @rule(kind=POOL, oid=OIDS, start=INDICES, page_nos=st.lists(MIXED_NO, min_size=1, max_size=40))
    def put_batch(self, kind: PoolKind, oid: int, start: int, page_nos: list[int]) -> None:
        keys = [(oid, start + i // 2) for i in range(len(page_nos))]  # with repeats
        pages = [MIXED[n] for n in page_nos]
        results = self.cache.put_batch(self.pools[kind], keys, pages)
        model = self.model[kind]
        for key, page, result in zip(keys, pages, results, strict=True):
            if result.refused:
                model.pop(key, None)
            else:
                model[key] = page

    @rule(kind=POOL, key=KEYS, exclusive=st.booleans())
    def get(self, kind: PoolKind, key: tuple[int, int], exclusive: bool) -> None:
        got = self.cache.get(self.pools[kind], *key, exclusive=exclusive)
        self.check_got(kind, key, got, exclusive)

    @rule(kind=POOL, keys=st.lists(KEYS, min_size=1, max_size=12), exclusive=st.booleans())
    def get_batch(self, kind: PoolKind, keys: list[tuple[int, int]], exclusive: bool) -> None:
        known = list(self.model[kind])[:6]  # mostly keys that hold pages
        keys = [*keys[: len(keys) // 2], *known]
        got = self.cache.get_batch(self.pools[kind], keys, exclusive=exclusive)
        for key, page in zip(keys, got, strict=True):
            self.check_got(kind, key, page, exclusive)

    @rule(kind=POOL, key=KEYS)
    def flush_page(self, kind: PoolKind, key: tuple[int, int]) -> None:
        had = self.cache.flush_page(self.pools[kind], *key)
        assert had == (key in self.model[kind]) or kind is PoolKind.EPHEMERAL
        self.model[kind].pop(key, None)

    @rule(kind=POOL, keys=st.lists(KEYS, max_size=40))
    def flush_pages(self, kind: PoolKind, keys: list[tuple[int, int]]) -> None:
        keys += list(self.model[kind])[:20]  # mostly keys that hold pages
        had = len(set(keys) & set(self.model[kind]))
        flushed = self.cache.flush_pages(self.pools[kind], keys)
        assert flushed == had or kind is PoolKind.EPHEMERAL
        for key in keys:
            self.model[kind].pop(key, None)

    @rule(kind=POOL, oid=OIDS)
    def flush_object(self, kind: PoolKind, oid: int) -> None:
        self.cache.flush_object(self.pools[kind], oid)
        model = self.model[kind]
        for key in [k for k in model if k[0] == oid]:
            del model[key]

    @rule(kind=POOL, keep=st.integers(min_value=2, max_value=4))
    def punch_holes(self, kind: PoolKind, keep: int) -> None:
        """Flush all but every `keep`-th page: holes in every zspage, for compaction."""
        model = self.model[kind]
        for n, key in enumerate(list(model)):
            if n % keep:
                assert self.cache.flush_page(self.pools[kind], *key) or kind is PoolKind.EPHEMERAL
                del model[key]

    @rule()
    def write_back_all(self) -> None:
        persistent = self.cache.pool(self.pools[PoolKind.PERSISTENT])
        in_ram = persistent.index.count - persistent.evicted
        eph = self.cache.pool(self.pools[PoolKind.EPHEMERAL]).index.count
        assert self.cache.write_back_all() == (in_ram, 0)
        assert persistent.evicted == persistent.index.count
        assert self.cache.pool(self.pools[PoolKind.EPHEMERAL]).index.count == eph

    @rule()
    def compact(self) -> None:
        before = self.cache.frames
        freed = self.cache.compact()
        assert freed >= 0 and self.cache.frames == before - freed

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.verify()
        persistent = self.cache.pool(self.pools[PoolKind.PERSISTENT])
        assert persistent.index.count == len(self.model[PoolKind.PERSISTENT])
        assert self.backing.live == sum(p.evicted for p in self.cache.pools.values())


def test_two_pools_of_both_kinds_match_dict_models() -> None:
    test_case = TwoPoolModel.TestCase
    test_case.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    test_case("runTest").runTest()
