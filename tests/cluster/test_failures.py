# Cluster failure tests with real node processes on loopback: a peer killed, stopped gracefully,
# frozen or lying must never cost a persistent page, and a get never returns wrong bytes.
from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.peering import Identity, PeerServicer
from ramster.bench.corpus import load_corpus
from ramster.client import AsyncClient, Client, KeyRange, PageUnavailable
from ramster.client.cluster import LocalCluster, free_ports
from ramster.client.local import LocalNode
from ramster.remote import ForeignStore
from ramster.v1 import peer_pb2, peer_pb2_grpc
from ramster.wire import PageStatus
from ramster.zcache.codec import compress
from tests.cluster.probes import distinct_pages
from tests.conftest import DATA

# quick failure detection, with room for a loaded 2-core machine to answer in time
FAST = ["--heartbeat-interval", "0.25", "--down-after", "5", "--peer-timeout", "1.5"]
PAGES = 20_000


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    """The project's own real pages (tests/data), so these tests run from any clone."""
    return load_corpus(DATA / "sample.pages")


def workload(corpus: list[bytes], n: int = PAGES) -> list[bytes]:
    """n real pages that each compress (refused pages would make "0 lost" trivially true),
    each stamped with its index so a page served under another key is caught."""
    good = [p for p in corpus if p != p[:8] * 512 and len(compress(p)) < 3000]
    return distinct_pages(good, 7, n)


def settle(client: Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.stats().remote_outbox and time.monotonic() < deadline:
        time.sleep(0.1)


def replica_counts(node: LocalNode) -> dict[str, float]:
    """Remote pages of a node by live copies, from its metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics").read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "ramster_remote_replicas_pages":
            for sample in family.samples:
                out[sample.labels["copies"]] = sample.value
    return out


def verify(client: Client, pool: int, pages: list[bytes], patience: float = 60) -> None:
    """Every page reads back equal.  UNAVAILABLE is transient by contract (no holder answered in
    time, e.g. one slowed down by a loaded machine), so those pages are asked again for a while;
    a miss, a corrupt page or wrong bytes fail at once."""
    got = client.get_many(pool, 7, 0, len(pages))
    for i, (status, page) in enumerate(zip(got.statuses, got.pages, strict=True)):
        deadline = time.monotonic() + patience
        while status is PageStatus.UNAVAILABLE and time.monotonic() < deadline:
            time.sleep(0.2)
            again = client.get_batch(pool, KeyRange(7, i, 1))
            status, page = again.statuses[0], again.pages[0]
        assert status is PageStatus.HIT and page == pages[i], f"page {i}: {status}"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3, common=FAST, per_node=[["--pool-limit", "4Mi"]]) as c:
        yield c


def fill(cluster: LocalCluster, pages: list[bytes]) -> tuple[Client, int]:
    client = Client(cluster.targets[0], timeout=60)
    pool = client.create_pool()
    outcomes = client.put_many(pool, 7, 0, pages)
    assert not any(o.refused for o in outcomes)
    settle(client)
    stats = client.stats()
    assert stats.remote_pages > len(pages) // 3, "the limit must push many pages to peers"
    return client, pool


@pytest.mark.slow
def test_sigkill_of_a_peer_loses_nothing_and_replicas_recover(
    cluster: LocalCluster, corpus: list[bytes]
) -> None:
    pages = workload(corpus)
    client, pool = fill(cluster, pages)
    assert set(replica_counts(cluster.nodes[0])) == {"2"}
    cluster.nodes[2].kill()
    deadline = time.monotonic() + 30
    while client.stats().peers_up > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.stats().peers_up == 1
    verify(client, pool, pages)
    deadline = time.monotonic() + 60
    while set(replica_counts(cluster.nodes[0])) != {"2"} and time.monotonic() < deadline:
        time.sleep(0.25)
    assert set(replica_counts(cluster.nodes[0])) == {"2"}  # the survivor plus the backing file
    assert client.stats().rereplicated_pages > 0
    assert client.stats().remote_lost_pages == 0
    verify(client, pool, pages)
    client.close()


@pytest.mark.slow
def test_sigterm_of_a_peer_during_traffic_loses_nothing(
    cluster: LocalCluster, corpus: list[bytes]
) -> None:
    pages = workload(corpus)
    client, pool = fill(cluster, pages[: PAGES // 2])
    cluster.nodes[1].send_signal(signal.SIGTERM)
    more = client.put_many(pool, 7, PAGES // 2, pages[PAGES // 2 :])  # traffic while it leaves
    assert not any(o.refused for o in more)
    assert cluster.nodes[1].wait(timeout=60) == 0
    settle(client)
    verify(client, pool, pages)
    log = cluster.nodes[1].log()
    assert '"event": "left"' in log
    client.close()


@pytest.mark.slow
def test_frozen_peer_does_not_hang_gets(cluster: LocalCluster, corpus: list[bytes]) -> None:
    pages = workload(corpus, 6000)
    client, pool = fill(cluster, pages)
    frozen = cluster.nodes[1]
    frozen.send_signal(signal.SIGSTOP)
    singles = range(0, len(pages), len(pages) // 40)
    try:
        started = time.monotonic()
        verify(client, pool, pages)  # every page has a copy on the other peer
        assert time.monotonic() - started < 30
        single_gets(client, pool, pages, singles)  # the owner's small fetches: one call each
    finally:
        frozen.send_signal(signal.SIGCONT)
    single_gets(client, pool, pages, [i + 1 for i in singles])  # a new call once thawed
    client.close()


def single_gets(client: Client, pool: int, pages: list[bytes], indexes: Iterable[int]) -> None:
    """Each page by a one-page get (the owner fetches it on its fetch call to a holder),
    asked again while it is UNAVAILABLE (no holder answered in time), for a while."""
    for i in indexes:
        deadline = time.monotonic() + 60
        while True:
            try:
                got = client.get(pool, 7, i)
                break
            except PageUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert got == pages[i], f"page {i}"


@pytest.mark.slow
def test_ephemeral_pages_may_go_but_never_come_back_wrong(
    cluster: LocalCluster, corpus: list[bytes]
) -> None:
    pages = workload(corpus, 6000)
    client = Client(cluster.targets[0], timeout=60)
    pool = client.create_pool(kind="ephemeral")
    client.put_many(pool, 7, 0, pages)
    cluster.nodes[2].kill()
    got = client.get_many(pool, 7, 0, len(pages))
    assert all(p is None or p == pages[i] for i, p in enumerate(got.pages))
    assert any(p is None for p in got.pages)  # the limit dropped some
    client.close()


class LyingPeer(PeerServicer):
    """A holder that flips one byte of every zpage it returns (unary or on a fetch call)."""

    def _get(self, request):  # type: ignore[no-untyped-def]
        reply = super()._get(request)
        blob = bytearray(reply.zpages)
        at = 0
        for size in reply.sizes:
            if size:
                blob[at + size - 1] ^= 0x01
            at += size
        return peer_pb2.GetZpagesResponse(zpages=bytes(blob), sizes=reply.sizes)


@pytest.mark.slow
async def test_corrupting_peer_is_detected_and_another_replica_serves(
    corpus: list[bytes],
) -> None:
    liar_port, good_port, owner_port = free_ports(3)
    peers = f"127.0.0.1:{liar_port},127.0.0.1:{good_port},127.0.0.1:{owner_port}"
    server = grpc.aio.server()
    liar = LyingPeer(ForeignStore(1 << 16), Identity("liar", uuid.uuid4().hex))
    peer_pb2_grpc.add_PeerServicer_to_server(liar, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{liar_port}")
    await server.start()
    good = LocalNode(
        "--peer-listen", f"127.0.0.1:{good_port}", "--node-id", "good", "--peers", peers, *FAST
    )
    owner = LocalNode(
        "--peer-listen",
        f"127.0.0.1:{owner_port}",
        "--node-id",
        "owner",
        "--peers",
        peers,
        "--pool-limit",
        "4Mi",
        *FAST,
    )
    pages = workload(corpus, 4000)
    try:
        await _lying_peer_scenario(liar, good, owner, pages)
    finally:
        await server.stop(0)


async def _lying_peer_scenario(
    liar: LyingPeer, good: LocalNode, owner: LocalNode, pages: list[bytes]
) -> None:
    with good, owner:
        async with AsyncClient(owner.target, timeout=60) as client:
            for _ in range(100):
                if (await client.stats()).peers_up == 2:
                    break
                await asyncio.sleep(0.1)
            pool = await client.create_pool()
            await client.put_many(pool, 7, 0, pages)
            for _ in range(300):
                if not (await client.stats()).remote_outbox:
                    break
                await asyncio.sleep(0.1)
            assert liar.foreign.pages > 0
            got = await client.get_many(pool, 7, 0, len(pages))
            assert all(s is PageStatus.HIT for s in got.statuses)
            assert got.pages == pages
        assert "damaged copy" in owner.log()
