# Client: the blocking client, a thin wrapper that runs AsyncClient's calls on a private event
# loop.  One implementation of every call (the async one) keeps both clients in step; the price
# is that a Client must not be used from inside a running event loop (use AsyncClient there).
# The pipelined Stream is async-only: a blocking caller gains nothing from it.
from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from ramster.client.aio import DEFAULT_TIMEOUT, AsyncClient, PoolInfo
from ramster.client.messages import GetResult, Keys
from ramster.client.tls import PathLike
from ramster.v1 import tmem_pb2 as pb
from ramster.wire import Outcome

T = TypeVar("T")


class Client:
    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        token: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        try:
            self._aio = self._run(self._open(target, timeout, tls, token))
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    async def _open(
        target: str, timeout: float, tls: dict[str, PathLike | None], token: str | None
    ) -> AsyncClient:
        # the channel binds to the running loop
        return AsyncClient(target, timeout=timeout, token=token, **tls)

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(call)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._aio.close())
            self._loop.close()

    @property
    def target(self) -> str:
        return self._aio.target

    def create_pool(
        self, kind: str = "persistent", allocator: str | None = None, timeout: float | None = None
    ) -> int:
        return self._run(self._aio.create_pool(kind, allocator, timeout))

    def destroy_pool(self, pool: int, timeout: float | None = None) -> int:
        return self._run(self._aio.destroy_pool(pool, timeout))

    def list_pools(self, timeout: float | None = None) -> list[PoolInfo]:
        return self._run(self._aio.list_pools(timeout))

    def accept_loss(self, pool: int, timeout: float | None = None) -> bool:
        return self._run(self._aio.accept_loss(pool, timeout))

    def put(
        self, pool: int, oid: int, index: int, page: bytes, timeout: float | None = None
    ) -> Outcome:
        return self._run(self._aio.put(pool, oid, index, page, timeout))

    def get(
        self,
        pool: int,
        oid: int,
        index: int,
        exclusive: bool = False,
        timeout: float | None = None,
    ) -> bytes | None:
        return self._run(self._aio.get(pool, oid, index, exclusive, timeout))

    def flush_page(self, pool: int, oid: int, index: int, timeout: float | None = None) -> bool:
        return self._run(self._aio.flush_page(pool, oid, index, timeout))

    def flush_object(self, pool: int, oid: int, timeout: float | None = None) -> int:
        return self._run(self._aio.flush_object(pool, oid, timeout))

    def put_batch(
        self, pool: int, keys: Keys, pages: Sequence[bytes], timeout: float | None = None
    ) -> list[Outcome]:
        return self._run(self._aio.put_batch(pool, keys, pages, timeout))

    def get_batch(
        self, pool: int, keys: Keys, exclusive: bool = False, timeout: float | None = None
    ) -> GetResult:
        return self._run(self._aio.get_batch(pool, keys, exclusive, timeout))

    def put_many(
        self, pool: int, oid: int, start: int, pages: Sequence[bytes], timeout: float | None = None
    ) -> list[Outcome]:
        return self._run(self._aio.put_many(pool, oid, start, pages, timeout))

    def get_many(
        self,
        pool: int,
        oid: int,
        start: int,
        count: int,
        exclusive: bool = False,
        timeout: float | None = None,
    ) -> GetResult:
        return self._run(self._aio.get_many(pool, oid, start, count, exclusive, timeout))

    def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        return self._run(self._aio.stats(timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return self._run(self._aio.health(service, timeout))
