# A state machine for the ramster layer on the in-memory network: owner "a" spills to holders
# b, c, d with two replicas, while holders die, come back, freeze, thaw, restart empty, start
# leaving or are cut off from the owner (a partition), one fault at a time (the second waits
# until the first is repaired, as an operator would), new holders join from one seed, holders
# leave for good, and the owner itself is killed or stopped and restarted on its data
# directory.  Between faults the client puts, reads and flushes.  After every step: no get
# returns wrong bytes, no persistent page is lost while a copy of it exists, the layer's tables
# agree with each other and with its membership; after a repair, a join or a departure, every
# page is back at its replica count.
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ramster.bench.corpus import load_corpus
from ramster.remote import RemoteConfig
from ramster.zcache import PageError, PageUnavailable
from ramster.zcache.codec import compress
from tests.conftest import DATA
from tests.remote.memnet import MemNetwork

PAGES = [p for p in load_corpus(DATA / "sample.pages") if len(compress(p)) < 3000]
HOLDERS = ["b", "c", "d"]
KEYS = 240


class LayerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory(prefix="layer-model-")
        config = RemoteConfig(heartbeat_interval=1.0, down_after=3.0, send_batch=32)
        self.net = MemNetwork(Path(self.tmp.name), ["a", *HOLDERS], 12, 2000, config)
        self.run(self.net.settle(2))
        self.pool = self.net.live_pool("a")[1]
        self.model: dict[int, bytes] = {}
        self.version = 0
        self.fault: str | None = None  # the holder currently failed, if any
        self.holders = list(HOLDERS)  # members besides a, in the order they joined
        self.joined = 0

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.loop.close()
        self.tmp.cleanup()

    @property
    def a(self):  # type: ignore[no-untyped-def]
        return self.net.nodes["a"]

    # -- client operations ------------------------------------------------------------------
    @rule(start=st.integers(0, KEYS - 1), count=st.integers(1, 40))
    def put(self, start: int, count: int) -> None:
        indexes = [(start + i) % KEYS for i in range(count)]
        pages = []
        for i in indexes:
            self.version += 1
            base = PAGES[(i + self.version) % len(PAGES)]
            pages.append(self.version.to_bytes(8, "little") + base[8:])
        results = self.a.cache.put_batch(self.pool, [(1, i) for i in indexes], pages)
        for i, page, result in zip(indexes, pages, results, strict=True):
            assert not result.refused
            self.model[i] = page
        self.run(self.net.settle(1))

    @rule(start=st.integers(0, KEYS - 1), count=st.integers(1, 60))
    def get(self, start: int, count: int) -> None:
        keys = [(1, (start + i) % KEYS) for i in range(count)]
        self.run(self.a.driver.prefetch(self.pool, keys))
        self.run(self.a.driver.ahead.drain())  # what it read ahead is done within the step
        got = self.a.cache.get_batch(self.pool, keys)
        for (_, i), page in zip(keys, got, strict=True):
            if isinstance(page, PageUnavailable):
                assert self.fault is not None, f"page {i} unavailable with every peer healthy"
            elif isinstance(page, PageError):
                raise AssertionError(f"page {i}: {page!r}")
            else:
                assert page == self.model.get(i), f"page {i} came back wrong"

    @rule(start=st.integers(0, KEYS - 1), count=st.integers(1, 20))
    def flush(self, start: int, count: int) -> None:
        for i in range(count):
            index = (start + i) % KEYS
            self.a.cache.flush_page(self.pool, 1, index)
            self.model.pop(index, None)
        self.run(self.net.settle(1))

    # -- faults -----------------------------------------------------------------------------
    @precondition(lambda self: self.fault is None)
    @rule(
        pick=st.integers(0, 15),
        how=st.sampled_from(["kill", "freeze", "restart", "leave", "partition"]),
    )
    def fail(self, pick: int, how: str) -> None:
        holder = self.holders[pick % len(self.holders)]
        node = self.net.nodes[holder]
        if how == "partition":
            self.net.cut.add(frozenset(("a", holder)))
        elif how == "kill":
            node.up = False
        elif how == "freeze":
            node.frozen = True
        elif how == "restart":
            node.restart_empty()
        else:
            node.leaving = True
        self.fault = holder
        self.run(self.net.settle(1))

    @precondition(lambda self: self.fault is not None)
    @rule()
    def heal(self) -> None:
        """The failed holder is repaired around (or comes back), and every page gets its
        copies again."""
        assert self.fault is not None
        self.run(self.net.settle(6))  # silent long enough to be marked down, then repairs
        node = self.net.nodes[self.fault]
        if node.leaving:
            node.restart_empty()
            node.leaving = False
        node.up, node.frozen = True, False
        self.net.cut.clear()
        self.fault = None
        self.run(self.net.settle(4))
        self.replicas_restored()

    def replicas_restored(self) -> None:
        hist = self.a.layer.replica_histogram()
        assert not hist or min(hist) >= 2, f"replicas not restored: {hist}"

    # -- membership -------------------------------------------------------------------------
    @precondition(lambda self: self.fault is None and len(self.holders) < 6)
    @rule(pick=st.integers(0, 15))
    def join(self, pick: int) -> None:
        """A new holder starts knowing one seed, a or a holder: every member learns it."""
        self.joined += 1
        name = f"n{self.joined}"
        members = ["a", *self.holders]
        self.net.join(name, [members[pick % len(members)]])
        self.holders.append(name)
        self.run(self.net.settle(3))
        peer = self.a.layer.membership.peers.get(name)
        assert peer is not None and peer.up and peer.synced, f"a did not take {name} in"

    @precondition(lambda self: self.fault is None and len(self.holders) > 2)
    @rule(pick=st.integers(0, 15))
    def leave_for_good(self, pick: int) -> None:
        """A holder announces it is leaving, is drained, stops and is never seen again."""
        holder = self.holders.pop(pick % len(self.holders))
        node = self.net.nodes[holder]
        node.leaving = True
        for _ in range(30):
            self.run(self.net.settle(1))
            if not node.foreign.pages_by_owner().get("a"):
                break
        assert not node.foreign.pages_by_owner().get("a"), f"{holder} was not drained"
        node.up = False
        self.run(self.net.settle(5))
        assert holder not in self.a.layer.membership.peers, f"{holder} was not forgotten"
        self.replicas_restored()

    @precondition(lambda self: self.fault is None)
    @rule(graceful=st.booleans())
    def restart_owner(self, graceful: bool) -> None:
        self.a.restart_owner(graceful)
        self.run(self.net.settle(3))
        if not graceful:  # pages in RAM alone are gone; what was remote or on disk is not
            keys = [(1, i) for i in sorted(self.model)]
            self.run(self.a.driver.prefetch(self.pool, keys))
            got = self.a.cache.get_batch(self.pool, keys)
            for (_, i), page in zip(keys, got, strict=True):
                assert page is None or page == self.model[i], f"page {i} came back wrong"
                if page is None:
                    del self.model[i]

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def tables_agree(self) -> None:
        layer = self.a.layer
        assert layer.stats.lost == 0
        table = layer.table
        live = list(table)
        assert len(live) == table.count
        for address, copies in table.copies.items():
            assert copies == len(table.held_by(address))
            assert all(address in table.holders_of(loc) for loc in table.held_by(address))
        assert all(location in table for location in layer._bytes)
        for address in table.copies:  # a member with copies is never forgotten
            assert not table.copies[address] or address in layer.membership.peers
        assert layer.outbox_bytes == sum(len(z) for z in layer._bytes.values())
        self.a.cache.verify()


@pytest.mark.slow
def test_layer_state_machine() -> None:
    LayerMachine.TestCase.settings = settings(
        max_examples=10,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    LayerMachine.TestCase().runTest()
