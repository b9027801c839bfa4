# Fuzzing a real node: random and mutated messages, and raw bytes, to every RPC of the client API
# (ramster.v1.Tmem) and the peer API (ramster.v1.Peer).  Whatever comes in, the node answers
# with a status of its own (never UNKNOWN or INTERNAL, which would be an escaped exception),
# health stays SERVING, the engine's and the foreign store's verify() pass, and the pages stored
# before (a tenant's pool, and an owner's sealed pages held for it) read back byte-identical.
#
# The node runs on its own event loop in a thread, so the hypothesis test can be synchronous and
# the engine is only touched on its loop.  Bounded by example count (about 20-40 s here).
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.server import Node
from node.settings import HostPort
from ramster.client import Client, KeyRange
from ramster.v1 import peer_pb2, tmem_pb2
from tests.node.conftest import node_settings

T = TypeVar("T")
TOKEN = "fuzzer-token-0123456789abcdef"
OWNER_TOKEN = "owner-token-0123456789abcdef"
CLEAN = {  # every status a well-behaved node may answer with
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
METHODS = [
    (f"/{service.full_name}/{method.name}", method)
    for module in (tmem_pb2, peer_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
INTS = {
    FieldDescriptor.TYPE_UINT64: 64,
    FieldDescriptor.TYPE_UINT32: 32,
    FieldDescriptor.TYPE_INT32: 31,
    FieldDescriptor.TYPE_ENUM: 31,
}


def edgy_int(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 4095, 4096, 4097, (1 << 32) - 1, 1 << 32, top]).filter(
            lambda v: v <= top
        ),
        st.integers(0, top),
    )


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in INTS:
        return edgy_int(INTS[field.type])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=80)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.integers(0, 5).map(lambda n: bytes(4096 * n)))
    return message_of(field.message_type, depth=1)


@st.composite
def message_of(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> bytes:
    """A serialized message of `descriptor` with random, often edge-valued, fields."""
    cls: Any = getattr(
        tmem_pb2 if descriptor.file is tmem_pb2.DESCRIPTOR else peer_pb2, descriptor.name
    )
    message = cls()
    for field in descriptor.fields:
        if depth > 2 or not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(message, field.name)
            items = draw(st.lists(message_of(field.message_type, depth + 1), max_size=2))
            if field.is_repeated:
                for item in items:
                    sub.add().MergeFromString(item)
            elif items:
                sub.MergeFromString(items[0])
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=6)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    data: bytes = message.SerializeToString()
    return data


@st.composite
def request_bytes(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """Raw bytes, a random message, or a random message with bytes flipped, cut or added."""
    how = draw(st.sampled_from(["raw", "message", "mutated"]))
    if how == "raw":
        return draw(st.binary(max_size=200))
    data = bytearray(draw(message_of(descriptor)))
    if how == "mutated" and data:
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8))
    return bytes(data)


class NodeThread:
    """A real node on its own event loop, in a thread."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def on_loop(self, call: Callable[[], T]) -> T:
        done: Future[T] = Future()

        def go() -> None:
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(go)
        return done.result(timeout=60)

    def close(self) -> None:
        self.run(self.node.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    tmp = tmp_path_factory.mktemp("fuzz")
    tokens = tmp / "tokens.toml"
    tokens.write_text(
        f'[tenants.fuzz]\ntokens = ["{TOKEN}"]\n[tenants.owner]\ntokens = ["{OWNER_TOKEN}"]\n'
    )
    settings_ = node_settings(tmp, tokens=tokens, peers=(HostPort("127.0.0.1", 1),))
    running = NodeThread(Node(settings_))
    running.run(running.node.start())
    yield running
    running.close()


def test_fuzzed_requests_break_nothing(
    running: NodeThread, sample_pages: list[bytes], tmp_path: Path
) -> None:
    node = running.node
    remote = node.remote
    assert remote is not None
    pages = sample_pages[:64]
    with Client(node.target, timeout=30, token=OWNER_TOKEN) as owner:
        pool = owner.create_pool()
        owner.put_many(pool, 3, 0, pages)
    held = [bytes([i]) * (100 + i) for i in range(16)]
    victim = peer_pb2.Owner(node_id="victim", incarnation="v" * 32)
    slots = list(range(16))
    peer_channel = grpc.insecure_channel(node.peer_target)
    peer_put = peer_channel.unary_unary("/ramster.v1.Peer/PutZpages")
    reply = peer_pb2.PutZpagesResponse.FromString(
        peer_put(
            peer_pb2.PutZpagesRequest(
                owner=victim,
                epoch=1,
                pool_id=5,
                zpages=b"".join(held),
                sizes=[len(b) for b in held],
                slots=slots,
            ).SerializeToString()
        )
    )
    assert list(reply.stored) == [True] * 16
    client_channel = grpc.insecure_channel(node.target)
    seen: dict[str, set[grpc.StatusCode]] = {}

    def call(path: str, method: Any, data: bytes, token: str | None) -> None:
        channel = peer_channel if path.startswith("/ramster.v1.Peer/") else client_channel
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            if method.client_streaming:
                stream = channel.stream_stream(path)
                list(stream(iter([data, data[::-1]]), timeout=10, metadata=metadata))
            elif method.server_streaming:
                list(channel.unary_stream(path)(data, timeout=10, metadata=metadata))
            else:
                channel.unary_unary(path)(data, timeout=10, metadata=metadata)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        seen.setdefault(path, set()).add(code)
        assert code in CLEAN, (path, code, data[:64])

    @settings(
        max_examples=1200,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from(METHODS).flatmap(
            lambda m: st.tuples(
                st.just(m), request_bytes(m[1].input_type), st.sampled_from([TOKEN, None])
            )
        )
    )
    def fuzz(case: tuple[tuple[str, Any], bytes, str | None]) -> None:
        (path, method), data, token = case
        call(path, method, data, token)

    fuzz()
    assert {path for path, _ in METHODS} <= set(seen)  # every RPC was reached
    health = health_pb2_grpc.HealthStub(client_channel)  # type: ignore[no-untyped-call]
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    running.on_loop(lambda: node.engine.verify() if node.engine else None)
    running.on_loop(remote.foreign.cache.verify)
    with Client(node.target, timeout=30, token=OWNER_TOKEN) as owner:
        got = owner.get_many(pool, 3, 0, len(pages))
        assert got.pages == pages
        assert [p.pool for p in owner.list_pools()] == [pool]
        owner.put_batch(pool, KeyRange(4, 0, 1), pages[:1])
    peer_get = peer_channel.unary_unary("/ramster.v1.Peer/GetZpages")
    back = peer_pb2.GetZpagesResponse.FromString(
        peer_get(
            peer_pb2.GetZpagesRequest(
                owner=victim,
                epoch=1,
                pool_id=5,
                slots=slots,
            ).SerializeToString()
        )
    )
    assert back.zpages == b"".join(held)
    peer_channel.close()
    client_channel.close()
