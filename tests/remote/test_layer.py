# The ramster layer's policy on an in-memory network: spill to peers with replicas, every page
# back after a peer dies, restarts, freezes, corrupts or leaves, flushes that reach holders in
# few calls, and a batch get that asks each holder once.
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from node.driver import FETCH_BATCH
from node.engine import ChunkedEngine
from ramster.remote import RemoteConfig, journal
from ramster.remote.foreign import MAX_BLOB
from ramster.remote.layer import FLUSH_BATCH
from ramster.remote.table import slot_of
from ramster.zcache import PageUnavailable, PoolKind
from ramster.zcache.evictor import LINK_SHIFT
from tests.remote.fulldisk import FullDiskOs
from tests.remote.memnet import MemNetwork, MemNode, MemTransport

N = 1500


async def spill(net: MemNetwork, pages: list[bytes]) -> tuple[MemNode, int, list[tuple[int, int]]]:
    """Node a stores N pages with a limit that sends most of them to peers."""
    await net.settle(1)
    a, pool = net.live_pool("a")
    keys = [(1, i) for i in range(N)]
    for start in range(0, N, 100):
        batch = keys[start : start + 100]
        results = a.cache.put_batch(pool, batch, [pages[i % len(pages)] for _, i in batch])
        assert not any(r.refused for r in results)
        await net.settle(1)
    await net.settle(2)
    return a, pool, keys


async def read_all(net: MemNetwork, a: MemNode, pool: int, keys: list[tuple[int, int]]) -> list:
    out = []
    for start in range(0, len(keys), 100):
        batch = keys[start : start + 100]
        await a.driver.prefetch(pool, batch)
        out.extend(a.cache.get_batch(pool, batch))
    return out


def expected(pages: list[bytes], keys: list[tuple[int, int]]) -> list[bytes]:
    return [pages[i % len(pages)] for _, i in keys]


async def test_spill_places_two_replicas_and_reads_back(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    assert a.layer.remote_pages > N // 2
    assert a.layer.replica_histogram() == {2: a.layer.remote_pages}
    assert net.nodes["b"].foreign.pages > 0 and net.nodes["c"].foreign.pages > 0
    assert a.layer.outbox == 0
    transport = a.driver.transport
    assert isinstance(transport, MemTransport)
    assert transport.seals == a.layer.remote_pages  # once per zpage, not once per copy
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
    a.cache.verify()


async def test_dead_peer_loses_nothing_and_replicas_come_back(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c", "d"])
    a, pool, keys = await spill(net, compressible_pages)
    held_by_b = len(a.layer.table.held_by("b"))
    assert held_by_b > 0
    net.nodes["b"].up = False
    await net.settle(6)
    assert a.layer.stats.rereplicated >= held_by_b
    assert a.layer.replica_histogram() == {2: a.layer.remote_pages}
    table = a.layer.table
    assert all(net.nodes[h].up for loc in table for h in table.holders_of(loc) if h != "b")
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
    assert a.layer.stats.lost == 0


async def test_restarted_peer_is_treated_as_empty(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    net.nodes["b"].restart_empty()
    await net.settle(4)
    assert a.layer.stats.rereplicated > 0
    hist = a.layer.replica_histogram()
    assert set(hist) == {2}  # c plus b again, or one of them plus the disk
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_only_one_peer_means_peer_plus_disk(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b"])
    a, pool, keys = await spill(net, compressible_pages)
    assert a.layer.stats.disk_copies == a.layer.remote_pages > 0
    net.nodes["b"].up = False
    await net.settle(5)
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_frozen_and_corrupting_holders_fall_back_to_replicas(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    net.nodes["b"].frozen = True
    net.nodes["c"].corrupt = True
    got = await read_all(net, a, pool, keys[:200])
    # b hangs and c lies: pages only they hold cannot be served, but none comes back wrong
    want = expected(compressible_pages, keys[:200])
    assert all(g == e or isinstance(g, PageUnavailable) for g, e in zip(got, want, strict=True))
    net.nodes["c"].corrupt = False
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_flushes_reach_every_holder(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, _ = await spill(net, compressible_pages)
    assert a.cache.flush_object(pool, 1) == N
    await net.settle(2)
    assert net.nodes["b"].foreign.pages == net.nodes["c"].foreign.pages == 0
    assert a.layer.remote_pages == 0


async def test_flushes_gather_into_few_calls_and_all_arrive(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    transport = a.driver.transport
    assert isinstance(transport, MemTransport)
    flushed = 3 * FLUSH_BATCH // 2
    for oid, index in keys[:flushed]:  # each flush wakes the pump, as on a node
        assert a.cache.flush_page(pool, oid, index)
        await a.driver.pump()
    calls = {peer: transport.calls["flush", peer] for peer in ("b", "c")}
    assert calls == {"b": 1, "c": 1}  # one batch each; the rest waits for more or for time
    await net.settle(2)  # a heartbeat interval later the rest is due
    for peer in ("b", "c"):
        assert transport.calls["flush", peer] == 2
        held = net.nodes[peer].foreign.pages_by_owner().get("a", 0)
        assert held == len(a.layer.table.held_by(peer))
    assert a.layer.flushes_pending == 0


async def test_a_batch_get_fetches_once_per_holder_not_per_chunk(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    transport = a.driver.transport
    assert isinstance(transport, MemTransport)
    batch = keys[:FETCH_BATCH]
    remote = sum(1 for loc in a.cache.evicted_locations(pool, batch) if loc)
    assert remote > FETCH_BATCH // 2
    before = sum(n for (method, _), n in transport.calls.items() if method == "get")
    got = await ChunkedEngine(a.cache, prefetch=a.driver.prefetch).get_batch(pool, batch, False)
    assert got == expected(compressible_pages, batch)
    gets = sum(n for (method, _), n in transport.calls.items() if method == "get") - before
    assert gets <= 2  # one call per holder (the engine reads it in 8-page chunks)


async def test_returning_peer_drops_what_it_should_no_longer_hold(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c", "d"])
    a, pool, keys = await spill(net, compressible_pages)
    b = net.nodes["b"]
    before = b.foreign.pages_by_owner().get("a", 0)
    assert before > 0
    b.up = False  # partitioned, same process
    await net.settle(6)
    b.up = True
    await net.settle(3)
    # its copies count again; those made redundant meanwhile were flushed
    assert b.foreign.pages_by_owner().get("a", 0) == len(a.layer.table.held_by("b"))
    assert a.layer.replica_histogram() == {2: a.layer.remote_pages}
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_copy_on_a_peer_that_was_down_is_not_given_up(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """Two failures at once: c dies while b is cut off.  Pages whose copies were on b and c
    wait for b instead of being declared lost, and are all there when b answers again."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    b = net.nodes["b"]
    b.up = False
    net.nodes["c"].up = False
    await net.settle(6)
    assert a.layer.stats.lost == 0
    b.up = True
    await net.settle(4)
    assert a.layer.stats.lost == 0
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


async def test_leaving_peer_is_drained(tmp_path: Path, compressible_pages: list[bytes]) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c", "d"])
    a, pool, keys = await spill(net, compressible_pages)
    b = net.nodes["b"]
    b.leaving = True
    await net.settle(4)
    assert b.foreign.pages_by_owner().get("a", 0) == 0
    b.up = False
    await net.settle(5)
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
    await net.settle(2)  # let what the reads queued settle
    assert a.layer.replica_histogram() == {2: a.layer.remote_pages}


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="replicas"):
        RemoteConfig(replicas=0)
    with pytest.raises(ValueError, match="heartbeat_interval"):
        RemoteConfig(heartbeat_interval=5, down_after=1)


async def test_own_address_and_twins_are_not_peers(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    net.nodes["c"].name = "a"  # c is misconfigured with a's node id
    await net.settle(1)
    peers = net.nodes["a"].layer.membership.peers
    assert set(peers) == {"b"}  # itself dropped, the twin ignored


@pytest.mark.parametrize("graceful", [True, False])
async def test_owner_restart_finds_its_remote_pages_and_leaves_no_orphan(
    tmp_path: Path, compressible_pages: list[bytes], graceful: bool
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    parked = a.layer.remote_pages
    a.restart_owner(graceful)
    a = net.nodes["a"]
    assert a.layer.stats.recovered == parked
    await net.settle(2)
    got = await read_all(net, a, pool, keys)
    want = expected(compressible_pages, keys)
    if graceful:  # the pages in RAM were written back too
        assert got == want
    else:  # what was remote or on disk is back; what was in RAM alone is a miss
        assert sum(p is not None for p in got) >= parked
        assert all(p is None or p == w for p, w in zip(got, want, strict=True))
    await net.settle(2)
    held = sum(net.nodes[n].foreign.pages for n in "bc")
    assert held == a.layer.peer_copies
    assert a.layer.stats.lost == 0


async def test_reclaim_drops_copies_a_holder_lost_and_flushes_unknown_ones(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    b = net.nodes["b"]
    lost = b.foreign.reclaim(a.owner, 1)[:10]  # b loses ten of a's copies behind a's back
    for pool_id, slot in lost:
        b.foreign.flush(a.owner, 1, pool_id, [slot])
    lost_slots = {slot for _, slot in lost}
    locations = dict(zip(keys, a.cache.evicted_locations(pool, keys), strict=True))
    remote = [k for k, loc in locations.items() if loc and loc >> LINK_SHIFT == 0]
    gone = {k for k in remote if slot_of(locations[k]) in lost_slots}
    assert len(gone) == len(lost)
    flushed = [k for k in remote if k not in gone][:20]
    for oid, index in flushed:  # flushed, but the crash eats the flushes owed to the holders
        assert a.cache.flush_page(pool, oid, index)
    orphans = sum(len(f) for f in a.layer._flushes.values())
    assert orphans >= 20
    a.restart_owner(graceful=False)
    a = net.nodes["a"]
    await net.settle(3)
    assert a.layer.stats.orphans_flushed == orphans
    assert sum(net.nodes[n].foreign.pages for n in "bc") == a.layer.peer_copies
    assert min(a.layer.replica_histogram()) == 2  # b's lost copies were placed again
    got = await read_all(net, a, pool, keys)
    want = expected(compressible_pages, keys)
    assert all(p is None or p == w for p, w in zip(got, want, strict=True))
    assert all(got[keys.index(k)] is None for k in flushed)


async def test_pages_read_lately_are_re_replicated_from_the_copy_fetched_for_the_get(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """A get leaves the fetched copy staged (the page stays remote when the pool is full);
    when a holder of such a page goes, that copy is what gets placed again."""
    net = MemNetwork(tmp_path, ["a", "b", "c", "d"])
    a, pool, keys = await spill(net, compressible_pages)
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
    assert a.layer._staged, "the gets staged nothing"
    net.nodes["b"].up = False
    await net.settle(6)
    hist = a.layer.replica_histogram()
    assert min(hist) >= 2, hist
    assert a.layer.stats.lost == 0


async def test_gets_in_order_find_their_pages_read_ahead(
    tmp_path: Path, compressible_pages: list[bytes]
) -> None:
    """From the second get of a stream on, the next pages are fetched while the client is busy:
    the third get finds all its pages fetched, and every page comes back right."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    batches = [keys[s : s + 64] for s in range(0, 256, 64)]
    third = [loc for loc in a.driver.locations(pool, batches[2]) if loc]
    assert len(third) == 64 and a.layer.fetch_for(third) is not None  # all remote, not fetched
    engine = ChunkedEngine(a.cache, prefetch=a.driver.prefetch)
    for batch in batches[:2]:
        assert await engine.get_batch(pool, batch, False) == expected(compressible_pages, batch)
    await a.driver.ahead.drain()
    assert a.layer.fetch_for(third) is None, "the third get would ask a holder"
    for batch in batches[2:]:
        assert await engine.get_batch(pool, batch, False) == expected(compressible_pages, batch)
    assert a.driver.ahead.pages >= 128


async def test_chunks_of_a_get_look_again_only_once_a_local_copy_went(
    tmp_path: Path, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get's chunks ask nothing more of the layer while the copies its batch fetched stay;
    once some go (here the staged limit drops them while another get fetches), each later chunk
    looks again and fetches what it misses, and every page comes back right."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys = await spill(net, compressible_pages)
    first, second, other = keys[:64], keys[64:128], keys[192:256]
    for batch in (first, second, other):
        assert all(a.driver.locations(pool, batch)), "the test wants remote pages"
    monkeypatch.setattr("ramster.remote.layer.STAGED_LIMIT", 64)
    asked: list[int] = []
    squeeze = False

    async def counted(pool_id: int, keys: list[tuple[int, int]]) -> Callable[[], bool] | None:
        asked.append(len(keys))
        local = await a.driver.prefetch(pool_id, keys)
        if squeeze and len(asked) == 1:  # another get's copies push this batch's out
            asked.append(-len(other))
            await a.driver.prefetch(pool_id, other)
        return local

    engine = ChunkedEngine(a.cache, chunk=8, prefetch=counted)
    assert await engine.get_batch(pool, first, False) == expected(compressible_pages, first)
    assert asked == [64]
    asked.clear()
    squeeze = True
    assert await engine.get_batch(pool, second, False) == expected(compressible_pages, second)
    assert asked == [64, -64] + [8] * 8


async def put_mixed(
    net: MemNetwork, compressible: list[bytes], incompressible: list[bytes]
) -> tuple[MemNode, int, list[tuple[int, int]], list[bytes]]:
    """Node a stores N pages, a third of them incompressible, in a store_raw pool (as an NBD
    export's) whose limit sends most of them out."""
    await net.settle(1)
    a = net.nodes["a"]
    pool = a.cache.create_pool(PoolKind.PERSISTENT, store_raw=True)
    kinds = (incompressible, compressible, compressible)
    pages = [kinds[i % 3][i % len(kinds[i % 3])] for i in range(N)]
    keys = [(1, i) for i in range(N)]
    for start in range(0, N, 100):
        batch = keys[start : start + 100]
        results = a.cache.put_batch(pool, batch, [pages[i] for _, i in batch])
        assert not any(r.refused for r in results)
        await net.settle(1)
    await net.settle(10, advance=2.0)  # down_after several times over
    return a, pool, keys, pages


async def test_raw_pages_reach_peers_like_any_other(
    tmp_path: Path, compressible_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    """A raw zpage (an incompressible page of a store_raw pool), longer than a holder's slot,
    gets its replicas on peers, which keep it in two slots, and comes back whole from either."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    a, pool, keys, pages = await put_mixed(net, compressible_pages, incompressible_pages)
    layer = a.layer
    assert layer.remote_pages > N // 2
    assert layer.replica_histogram() == {2: layer.remote_pages}
    assert layer.stats.outbox_refused == layer.stats.remote_refused == 0
    assert layer.stats.disk_copies == 0
    for holder in (net.nodes["b"], net.nodes["c"]):
        assert holder.foreign.pages == layer.remote_pages
        tails = holder.foreign.cache.stored_pages - holder.foreign.pages  # raw pages held
        assert tails > N // 4
    net.nodes["b"].up = False
    await net.settle(5)
    assert await read_all(net, a, pool, keys) == pages


async def test_zpages_longer_than_a_holder_takes_go_to_disk_and_are_never_offered(
    tmp_path: Path, compressible_pages: list[bytes], incompressible_pages: list[bytes]
) -> None:
    """evict() leaves a zpage longer than largest_zpage to the disk at once.  Taken into the
    outbox, it was refused by every peer, settled short of copies and fetched back from disk
    to be offered again every down_after, for ever (so it went with raw pages, when a holder
    took no blob longer than a slot)."""
    config = RemoteConfig(heartbeat_interval=1.0, down_after=3.0, largest_zpage=MAX_BLOB)
    net = MemNetwork(tmp_path, ["a", "b", "c"], config=config)
    a, pool, keys, pages = await put_mixed(net, compressible_pages, incompressible_pages)
    layer = a.layer
    assert layer.remote_pages > N // 3  # the compressible pages went to peers ...
    assert layer.replica_histogram() == {2: layer.remote_pages}
    assert layer.stats.outbox_refused >= N // 4  # ... the raw ones straight to disk
    assert layer.stats.remote_refused == 0 and layer.stats.repairs_pending == 0
    assert await read_all(net, a, pool, keys) == pages


async def test_a_journal_that_cannot_write_stops_new_remote_pages_not_the_node(
    tmp_path: Path, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the disk full the journal's records wait in memory; past journal_waiting_limit
    evict() leaves new zpages to the next evictor, so their number stays bounded, and every
    page still reads back."""
    config = RemoteConfig(heartbeat_interval=1.0, down_after=3.0, journal_waiting_limit=200)
    net = MemNetwork(tmp_path, ["a", "b", "c"], config=config)
    monkeypatch.setattr(journal, "os", FullDiskOs())
    a, pool, keys = await spill(net, compressible_pages)
    layer = a.layer
    assert layer.journal is not None and layer.journal.unwritten
    assert 200 <= layer.journal.waiting < 200 + 4 * config.send_batch  # replies in flight
    assert layer.stats.outbox_refused > 0 and layer.remote_pages < N // 2
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)


@pytest.mark.parametrize("room", [0, 600 * 32], ids=["no_record", "some_records"])
async def test_pages_whose_journal_records_the_disk_refused_keep_their_bytes_and_come_back(
    tmp_path: Path, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    """With the disk full (from the start, or after some records) the peers' stored replies
    are recorded in memory only: a zpage keeps its bytes in the outbox until its records are
    on disk, so a graceful stop gives it a disk copy, and every page reads back after the
    restart (the peers' copies the journal never named are flushed as orphans)."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    disk = FullDiskOs(room)
    monkeypatch.setattr(journal, "os", disk)
    a, pool, keys = await spill(net, compressible_pages)
    layer = a.layer
    assert layer.journal is not None and layer.journal.unwritten
    # a page's records are a KEY and two HOLDERs: at most saved // 3 pages have them all
    assert layer.replica_histogram() == {2: layer.remote_pages}
    unsaved = layer.remote_pages - layer.journal.saved // 3
    assert layer.outbox >= unsaved > layer.remote_pages // 2
    if room:  # the pages recorded first let their bytes go
        assert layer.outbox < layer.remote_pages
    a.restart_owner(graceful=True)
    a = net.nodes["a"]
    await net.settle(2)
    assert await read_all(net, a, pool, keys) == expected(compressible_pages, keys)
    assert a.layer.stats.lost == 0
    assert sum(net.nodes[n].foreign.pages for n in "bc") == a.layer.peer_copies


async def test_bytes_kept_for_the_journal_go_once_the_disk_has_room_again(
    tmp_path: Path, compressible_pages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next commit (the driver pumps at least every heartbeat interval) writes the records
    that waited, the bytes they kept go, and a crash after that finds every remote page again
    from the journal."""
    net = MemNetwork(tmp_path, ["a", "b", "c"])
    disk = FullDiskOs()
    monkeypatch.setattr(journal, "os", disk)
    a = (await spill(net, compressible_pages))[0]
    layer = a.layer
    assert layer.journal is not None and layer.journal.unwritten
    assert layer.outbox >= layer.remote_pages > N // 2
    disk.room = 1 << 30
    await net.settle(2)
    assert not layer.journal.unwritten and layer.outbox == 0
    parked = layer.remote_pages
    a.restart_owner(graceful=False)
    a = net.nodes["a"]
    assert a.layer.stats.recovered == parked
