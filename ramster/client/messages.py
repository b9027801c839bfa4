# Client-side encoding of requests and decoding of replies, shared by the unary batch calls and
# the stream, so a batch means the same thing whichever way it travels.
#
# Keys are given either as (oid, index) pairs or, for the common case of consecutive pages of
# one object, as a KeyRange, which goes on the wire as one oid and a range of indexes with no
# per-page tuple built on either end.
#
# Batches are written and read with ramster.bulkwire: a put's pages go out as one join of the
# caller's pages (no protobuf copy), and a get's reply is sliced into pages straight from the
# received bytes.
#
# Every request is checked here as the node would check it (ramster.wire), so a key out of
# range or pages that do not match their keys raise InvalidArgument (a ValueError) before
# anything is sent, instead of reaching the node, or worse, being cut to fit a field.
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from ramster import bulkwire
from ramster.bulkwire import Parts
from ramster.client.errors import InvalidArgument, RamsterError
from ramster.v1 import tmem_pb2 as pb
from ramster.wire import (
    INDEX_LIMIT,
    MAX_BATCH_PAGES,
    OID_LIMIT,
    PAGE_SIZE,
    Outcome,
    PageStatus,
    all_in_range,
    check_count,
    check_index,
    check_pages,
    check_pool,
    in_range,
)

_OUTCOME = {int(o): o for o in Outcome}  # wire number -> enum, without a per-page enum call
_STATUS = {int(s): s for s in PageStatus}


@dataclass(frozen=True)
class KeyRange:
    """Pages start, start+1, ..., start+count-1 of one object."""

    oid: int
    start: int
    count: int

    def chunks(self, size: int = MAX_BATCH_PAGES) -> Iterator[KeyRange]:
        for first in range(0, self.count, size):
            yield KeyRange(self.oid, self.start + first, min(size, self.count - first))


Keys = Sequence[tuple[int, int]] | KeyRange


@dataclass(frozen=True)
class GetResult:
    """Per requested key: its status, and its page on a hit (None for a miss or corrupt page)."""

    statuses: list[PageStatus]
    pages: list[bytes | None]

    @property
    def hits(self) -> int:
        return self.statuses.count(PageStatus.HIT)

    @property
    def corrupt(self) -> list[int]:
        """Positions of pages whose stored copy failed verification."""
        return [n for n, s in enumerate(self.statuses) if s is PageStatus.CORRUPT]

    @staticmethod
    def joined(results: Sequence[GetResult]) -> GetResult:
        """The results of consecutive parts of one batch, as the batch's result."""
        return GetResult(
            [s for r in results for s in r.statuses], [p for r in results for p in r.pages]
        )


@contextlib.contextmanager
def refused_here() -> Iterator[None]:
    """A ValueError of the checks inside becomes InvalidArgument: what the node would say."""
    try:
        yield
    except InvalidArgument:
        raise
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def pool_key(pool: int) -> int:
    """A pool id, checked."""
    with refused_here():
        return check_pool(pool)


def object_key(pool: int, oid: int) -> tuple[int, int]:
    """(pool, oid), checked."""
    with refused_here():
        return check_pool(pool), in_range("oid", oid, OID_LIMIT)


def page_key(pool: int, oid: int, index: int) -> tuple[int, int, int]:
    """(pool, oid, index), checked."""
    with refused_here():
        return (*object_key(pool, oid), check_index(index))


def page_put_request(pool: int, oid: int, index: int, page: bytes) -> Parts:
    """A one-page put as a PutBatchRequest's parts, checked as the node would."""
    pool, oid, index = page_key(pool, oid, index)
    if len(page) != PAGE_SIZE:
        raise InvalidArgument(f"a page must be exactly {PAGE_SIZE} bytes, got {len(page)}")
    return bulkwire.put_batch_request(
        pb.PutBatchRequest(pool=pool, oids=[oid], indexes=[index]), [page]
    )


def key_fields(keys: Keys) -> tuple[list[int], Sequence[int]]:
    """A batch's oids and indexes, checked for count and range."""
    indexes: Sequence[int]
    if isinstance(keys, KeyRange):
        oids, indexes = [keys.oid], range(keys.start, keys.start + keys.count)
    else:
        oids, indexes = [k[0] for k in keys], [k[1] for k in keys]
    with refused_here():
        check_count(len(indexes))
        all_in_range("oids", oids, OID_LIMIT)
        all_in_range("indexes", indexes, INDEX_LIMIT)
    return oids, indexes


def _cuts(count: int, most: int) -> list[slice]:
    """Positions of runs of at most `most` of `count` items (one empty run when count is 0)."""
    return [slice(at, at + most) for at in range(0, count, most)] or [slice(0, 0)]


def put_batch_requests(
    pool: int, keys: Keys, pages: Sequence[bytes], most: int = MAX_BATCH_PAGES
) -> list[Parts]:
    """A put batch as PutBatchRequests' parts (ramster.bulkwire) of at most `most` pages each,
    the whole batch checked before any is made."""
    oids, indexes = key_fields(keys)
    if len(indexes) != len(pages):
        raise InvalidArgument(f"{len(indexes)} keys but {len(pages)} pages")
    with refused_here():
        check_pages(pages)
    pool = pool_key(pool)
    return [
        bulkwire.put_batch_request(
            pb.PutBatchRequest(
                pool=pool, oids=oids if len(oids) == 1 else oids[at], indexes=indexes[at]
            ),
            pages[at],
        )
        for at in _cuts(len(indexes), most)
    ]


def get_batch_requests(
    pool: int, keys: Keys, exclusive: bool, most: int = MAX_BATCH_PAGES
) -> list[pb.GetBatchRequest]:
    """A get batch as GetBatchRequests of at most `most` keys each, the whole batch checked
    before any is made."""
    oids, indexes = key_fields(keys)
    pool = pool_key(pool)
    return [
        pb.GetBatchRequest(
            pool=pool,
            oids=oids if len(oids) == 1 else oids[at],
            indexes=indexes[at],
            exclusive=exclusive,
        )
        for at in _cuts(len(indexes), most)
    ]


def decode_put(reply: pb.PutBatchResponse) -> list[Outcome]:
    return [_OUTCOME[o] for o in reply.outcomes]


def decode_get(reply: pb.GetBatchResponse, blob: memoryview) -> GetResult:
    """A get's result from its statuses and its pages (a view of the received reply)."""
    statuses = [_STATUS[s] for s in reply.statuses]
    hits = statuses.count(PageStatus.HIT)
    if blob.nbytes != hits * PAGE_SIZE:
        raise RamsterError(
            f"malformed reply: {blob.nbytes} bytes of pages for {hits} hits",
            grpc.StatusCode.INTERNAL,
        )
    pages: list[bytes | None] = []
    at = 0
    for status in statuses:
        if status is PageStatus.HIT:
            pages.append(blob[at : at + PAGE_SIZE].tobytes())
            at += PAGE_SIZE
        else:
            pages.append(None)
    return GetResult(statuses, pages)
