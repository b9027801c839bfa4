# Tenants and tokens on a real node (in-process, loopback): calls without a valid bearer token
# are UNAUTHENTICATED, a tenant cannot see, read, write, flush or destroy another tenant's pool
# (NOT_FOUND, word for word as for a pool that does not exist), quotas answer RESOURCE_EXHAUSTED,
# and tokens show up in no log line, error message or metric.
from __future__ import annotations

import asyncio
import logging
import os
import sys
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from node.pools import TAG_BITS, TAGS, PoolRecord, PoolRegistry
from node.server import Node
from node.tenants import load_tenants
from ramster.client import AsyncClient, KeyRange, PageStatus
from ramster.client.errors import NotFound, RamsterError, ResourceExhausted
from ramster.zcache import PoolKind
from tests.node.conftest import node_settings
from tests.node.test_metrics import fetch_metrics

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
OPS = "ops-token-0123456789abcdef"
TOKENS = f"""
[tenants.alice]
tokens = ["{ALICE}"]
pools = 3
pages = 40

[tenants.bob]
tokens = ["{BOB}"]

[tenants.ops]
tokens = ["{OPS}"]
operator = true
"""


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    started = Node(node_settings(tmp_path, tokens=tokens, max_streams=2))
    await started.start()
    yield started
    await started.stop(grace=1)


async def test_calls_need_a_valid_token_and_health_does_not(
    node: Node, caplog: pytest.LogCaptureFixture, compressible_pages: list[bytes]
) -> None:
    caplog.set_level(logging.DEBUG)
    for token in (None, "not-a-token-of-this-node", f"{ALICE}x"):
        async with AsyncClient(node.target, timeout=10, token=token) as anonymous:
            assert await anonymous.health() == "SERVING"
            for call in (anonymous.list_pools(), anonymous.create_pool(), anonymous.stats()):
                with pytest.raises(RamsterError) as failed:
                    await call
                assert failed.value.code is grpc.StatusCode.UNAUTHENTICATED
                assert ALICE not in str(failed.value)
            with pytest.raises(RamsterError) as failed:
                async with anonymous.stream() as stream:
                    await (await stream.put_batch(0, KeyRange(1, 0, 1), compressible_pages[:1]))
            assert failed.value.code is grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(node.target, timeout=10, token=ALICE) as alice:
        pool = await alice.create_pool()
        await alice.put(pool, 1, 0, compressible_pages[0])
        with pytest.raises(RamsterError):
            await alice.put(pool, 1, 1 << 33, compressible_pages[0])
    metrics = await asyncio.to_thread(fetch_metrics, node)  # the node's loop must answer it
    assert 'grpc_code="Unauthenticated"' in metrics
    for secret in (ALICE, BOB, ALICE[:12]):
        assert secret not in metrics
        assert secret not in caplog.text


async def test_a_tenant_cannot_touch_another_tenants_pool(
    node: Node, compressible_pages: list[bytes]
) -> None:
    pages = compressible_pages[:8]
    async with (
        AsyncClient(node.target, timeout=10, token=ALICE) as alice,
        AsyncClient(node.target, timeout=10, token=BOB) as bob,
    ):
        pool = await alice.create_pool()
        await alice.put_many(pool, 7, 0, pages)
        bobs = await bob.create_pool()
        assert [p.pool for p in await alice.list_pools()] == [pool]
        assert [p.pool for p in await bob.list_pools()] == [bobs]
        assert [p.pool for p in (await bob.stats()).pools] == [bobs]
        missing = max(pool, bobs) + 12345
        attempts = {
            "get": lambda p: bob.get(p, 7, 0),
            "get_batch": lambda p: bob.get_many(p, 7, 0, 8),
            "put": lambda p: bob.put(p, 7, 0, compressible_pages[20]),
            "put_batch": lambda p: bob.put_many(p, 7, 0, compressible_pages[20:28]),
            "flush_page": lambda p: bob.flush_page(p, 7, 0),
            "flush_object": lambda p: bob.flush_object(p, 7),
            "destroy": lambda p: bob.destroy_pool(p),
            "accept_loss": lambda p: bob.accept_loss(p),
        }
        for name, attempt in attempts.items():
            messages = []
            for target in (pool, missing):
                with pytest.raises(NotFound) as failed:
                    await attempt(target)
                messages.append(str(failed.value).replace(str(target), "ID"))
            assert messages[0] == messages[1], name  # nothing tells the two apart
        async with bob.stream() as stream:
            with pytest.raises(NotFound):
                await (await stream.get_batch(pool, KeyRange(7, 0, 8)))
        got = await alice.get_many(pool, 7, 0, 8)
        assert got.statuses == [PageStatus.HIT] * 8 and got.pages == pages
        assert await alice.destroy_pool(pool) == 8


async def test_quotas_answer_resource_exhausted(
    node: Node, compressible_pages: list[bytes]
) -> None:
    async with AsyncClient(node.target, timeout=10, token=ALICE) as alice:
        pools = [await alice.create_pool() for _ in range(3)]
        with pytest.raises(ResourceExhausted, match="quota of 3 pools"):
            await alice.create_pool()
        await alice.put_many(pools[0], 1, 0, compressible_pages[:40])
        with pytest.raises(ResourceExhausted, match="quota of 40 stored pages"):
            await alice.put(pools[1], 1, 0, compressible_pages[40])
        await alice.flush_page(pools[0], 1, 0)
        await alice.put(pools[1], 1, 0, compressible_pages[40])  # room again
        await alice.destroy_pool(pools[2])
        await alice.create_pool()


async def test_without_tokens_the_pool_limit_still_holds(tmp_path: Path) -> None:
    node = Node(node_settings(tmp_path, max_pools=4))
    await node.start()
    try:
        async with AsyncClient(node.target, timeout=10) as client:
            for _ in range(4):
                await client.create_pool()
            with pytest.raises(ResourceExhausted):
                await client.create_pool()
    finally:
        await node.stop(grace=1)


def test_pool_ids_are_tagged_and_never_come_back(tmp_path: Path) -> None:
    def create(registry: PoolRegistry) -> int:
        pool_id = registry.new_id(())
        registry.add(PoolRecord(pool_id, PoolKind.PERSISTENT, "zbud"))
        return pool_id

    registry = PoolRegistry(tmp_path)
    first = create(registry)
    tag = first >> TAG_BITS
    assert 0 < tag < TAGS and first < 1 << 32
    registry.remove(first)
    registry.close()
    registry = PoolRegistry(tmp_path)  # an id handed out before is not handed out again
    second = create(registry)
    assert second >> TAG_BITS == tag and second > first
    registry.counter = TAGS - 1
    last, fresh = create(registry), create(registry)
    assert last == tag << TAG_BITS | TAGS - 1
    assert fresh >> TAG_BITS not in (0, tag)  # the counter ran out: a new tag
    registry.remove(fresh)
    registry.close()
    registry = PoolRegistry(tmp_path)
    assert create(registry) == fresh + 1
    assert {0, tag, fresh >> TAG_BITS} <= registry.used_tags
    registry.close()


def test_a_registry_from_before_tags_keeps_its_ids(tmp_path: Path) -> None:
    (tmp_path / "pools.log").write_text(
        '{"next_id": 3}\n{"add": {"pool_id": 2, "kind": "persistent", "allocator": "zbud"}}\n'
    )
    registry = PoolRegistry(tmp_path)
    assert list(registry.pools) == [2] and registry.pools[2].kind is PoolKind.PERSISTENT
    assert registry.new_id(()) >> TAG_BITS != 0
    registry.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[tenants.a]\ntokens = ["short"]', "16\\+ characters"),
        (f'[tenants.a]\ntokens = ["{ALICE}"]\n[tenants.b]\ntokens = ["{ALICE}"]', "another"),
        ("[tenants.a]\npools = 3", "needs tokens"),
        (f'[tenants.a]\ntokens = ["{ALICE}"]\npools = -1', "whole number"),
        (f'[tenants.a]\ntokens = ["{ALICE}"]\ncolor = 1', "unknown key"),
        ("tenants = 3", "names no"),
        ("[tenants", "does not parse"),
    ],
)
def test_bad_tokens_files_are_refused_without_echoing_tokens(
    tmp_path: Path, text: str, error: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as failed:
        load_tenants(path, 8)
    assert ALICE not in str(failed.value)


def test_a_json_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(f'{{"tenants": {{"a": {{"tokens": ["{ALICE}"], "pages": 5}}}}}}')
    tenants = load_tenants(path, 8)
    alice = tenants.authenticate([("authorization", f"Bearer {ALICE}")])
    assert alice is not None and (alice.name, alice.max_pools, alice.max_pages) == ("a", 8, 5)
    assert tenants.authenticate([("authorization", ALICE)]) is None  # no Bearer scheme
    assert tenants.authenticate([]) is None


async def test_stats_show_a_tenant_its_own_pages_and_an_operator_the_node(
    node: Node, compressible_pages: list[bytes]
) -> None:
    async with (
        AsyncClient(node.target, timeout=10, token=ALICE) as alice,
        AsyncClient(node.target, timeout=10, token=BOB) as bob,
        AsyncClient(node.target, timeout=10, token=OPS) as ops,
    ):
        await alice.put_many(await alice.create_pool(), 1, 0, compressible_pages[:30])
        bobs = await bob.create_pool()
        await bob.put_many(bobs, 1, 0, compressible_pages[30:35])
        await bob.get_many(bobs, 1, 0, 5)
        seen = await bob.stats()
        assert (seen.stored_pages, seen.puts, seen.gets, seen.pool_size_bytes) == (5, 0, 0, 0)
        assert [(p.pool, p.pages) for p in seen.pools] == [(bobs, 5)]
        everything = await ops.stats()
        assert everything.stored_pages == 35 and everything.puts >= 35
        assert everything.pool_size_bytes > 0 and everything.pools == []


async def test_open_streams_are_limited_per_tenant(
    node: Node, compressible_pages: list[bytes]
) -> None:
    async with (
        AsyncClient(node.target, timeout=10, token=ALICE) as alice,
        AsyncClient(node.target, timeout=10, token=BOB) as bob,
    ):
        pool = await alice.create_pool()
        async with alice.stream() as first, alice.stream() as second:
            for stream in (first, second):
                await (await stream.put_batch(pool, KeyRange(1, 0, 1), compressible_pages[:1]))
            with pytest.raises(ResourceExhausted, match="--max-streams"):
                async with alice.stream() as third:
                    await (await third.get_batch(pool, KeyRange(1, 0, 1)))
            async with bob.stream() as other:  # another tenant is not held back
                await (
                    await other.put_batch(
                        await bob.create_pool(), KeyRange(1, 0, 1), compressible_pages[:1]
                    )
                )
        async with alice.stream() as again:  # closed streams count no more
            assert (
                await (await again.get_batch(pool, KeyRange(1, 0, 1)))
            ).pages == compressible_pages[:1]


async def test_the_cli_reads_its_token_from_a_file_or_the_environment(
    node: Node, tmp_path: Path
) -> None:
    token_file = tmp_path / "alice.token"
    token_file.write_text(ALICE + "\n")
    async with AsyncClient(node.target, timeout=10, token=ALICE) as alice:
        pool = await alice.create_pool()

    async def cli(*args: str, **env: str) -> tuple[int, str]:
        command = [sys.executable, "-m", "ramster.cli.main", "pools", "list"]
        proc = await asyncio.create_subprocess_exec(
            *command,
            "--target",
            node.target,
            *args,
            env={**os.environ, **env},
            stdout=PIPE,
            stderr=STDOUT,
        )
        out, _ = await proc.communicate()
        return await proc.wait(), out.decode()

    code, out = await cli("--token-file", str(token_file))
    assert code == 0 and str(pool) in out
    code, out = await cli(RAMSTER_TOKEN_FILE=str(token_file))
    assert code == 0 and str(pool) in out
    code, out = await cli("--token-file", str(tmp_path / "missing"))
    assert code == 2 and "cannot read the token file" in out and "Traceback" not in out
    code, out = await cli()
    assert code != 0 and "UNAUTHENTICATED" in out and ALICE not in out
