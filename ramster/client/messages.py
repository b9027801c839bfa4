# Client-side encoding of requests and decoding of replies, shared by the unary batch calls and
# the stream, so a batch means the same thing whichever way it travels.
#
# Keys are given either as (oid, index) pairs or, for the common case of consecutive pages of
# one object, as a KeyRange, which goes on the wire as one oid and a range of indexes with no
# per-page tuple built on either end.
#
# Every request is checked here as the node would check it (ramster.client.wire), so a key out of
# range or pages that do not match their keys raise InvalidArgument (a ValueError) before
# anything is sent, instead of reaching the node, or worse, being cut to fit a field.
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from ramster.client.errors import InvalidArgument, RamsterError
from ramster.client.wire import (
    INDEX_LIMIT,
    MAX_BATCH_PAGES,
    OID_LIMIT,
    PAGE_SIZE,
    Outcome,
    PageStatus,
    all_in_range,
    check_index,
    check_pool,
    in_range,
    join_pages,
    split_pages,
)
from ramster.v1 import tmem_pb2 as pb

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


@contextlib.contextmanager
def refused_here() -> Iterator[None]:
    """A ValueError of the checks inside becomes InvalidArgument: what the node would say."""
    try:
        yield
    except InvalidArgument:
        raise
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def key(pool: int, oid: int | None = None, index: int | None = None) -> dict[str, int]:
    """The checked key fields of a request naming a pool, an object or one page."""
    with refused_here():
        fields = {"pool": check_pool(pool)}
        if oid is not None:
            fields["oid"] = in_range("oid", oid, OID_LIMIT)
        if index is not None:
            fields["index"] = check_index(index)
    return fields


def key_fields(keys: Keys) -> tuple[list[int], Sequence[int]]:
    """A batch's oids and indexes, checked for range."""
    indexes: Sequence[int]
    if isinstance(keys, KeyRange):
        oids, indexes = [keys.oid], range(keys.start, keys.start + keys.count)
    else:
        oids, indexes = [k[0] for k in keys], [k[1] for k in keys]
    with refused_here():
        all_in_range("oids", oids, OID_LIMIT)
        all_in_range("indexes", indexes, INDEX_LIMIT)
    return oids, indexes


def put_batch_request(pool: int, keys: Keys, pages: Sequence[bytes]) -> pb.PutBatchRequest:
    oids, indexes = key_fields(keys)
    if len(indexes) != len(pages):
        raise InvalidArgument(f"{len(indexes)} keys but {len(pages)} pages")
    with refused_here():
        blob = join_pages(pages)
    return pb.PutBatchRequest(**key(pool), oids=oids, indexes=indexes, pages=blob)


def get_batch_request(pool: int, keys: Keys, exclusive: bool) -> pb.GetBatchRequest:
    oids, indexes = key_fields(keys)
    return pb.GetBatchRequest(**key(pool), oids=oids, indexes=indexes, exclusive=exclusive)


def decode_put(reply: pb.PutBatchResponse) -> list[Outcome]:
    return [_OUTCOME[o] for o in reply.outcomes]


def decode_get(reply: pb.GetBatchResponse) -> GetResult:
    statuses = [_STATUS[s] for s in reply.statuses]
    blob = reply.pages
    if len(blob) == len(statuses) * PAGE_SIZE:  # every page a hit: the fast path
        return GetResult(statuses, list(split_pages(blob, len(statuses))))
    pages: list[bytes | None] = []
    at = 0
    for status in statuses:
        if status is PageStatus.HIT:
            pages.append(blob[at : at + PAGE_SIZE])
            at += PAGE_SIZE
        else:
            pages.append(None)
    if at != len(blob):
        raise RamsterError(
            f"malformed reply: {len(blob)} bytes of pages for {at // PAGE_SIZE} hits",
            grpc.StatusCode.INTERNAL,
        )
    return GetResult(statuses, pages)
