# The bulk messages of ramster.v1 (PutBatch, GetBatch and Stream) read and written without
# copying their pages through protobuf objects.  The bytes on the wire are plain ramster.v1
# protobuf; only the way this process reads and writes them differs.
#
# Why: a 1,024-page batch is a 4 MiB bytes field.  Through protobuf objects every end copies it
# several times in one piece on the event loop: parsing (the message, then the field on access),
# slicing pages, and on the way out joining the hits, setting the field, nesting the batch in a
# StreamResponse (a deep copy: ~7 ms for 4 MiB) and serialising.  Each is a stall that a small
# call queued behind it waits out.  Here:
#   - reading, lift() walks the message's fields by their tags (a handful per message), takes the
#     one pages field as a memoryview of the received bytes, and hands protobuf the rest (the
#     keys: a few KiB) to parse as usual, so every other field keeps protobuf's own semantics
#     (packed or not, merged repeats, unknown fields, oneof);
#   - writing, a reply or request is a list of parts (a small header protobuf encodes or we
#     encode here, then the pages themselves) joined once at the end; that join releases the
#     GIL, so a caller may run it in a thread.
# Malformed input raises protobuf's DecodeError, as parsing would have.
#
# Trade-off: protobuf's wire format is read and written by hand for the few fields this lifts or
# writes (their numbers come from the generated descriptors, so a renumbered field follows), and
# a packed enum is written one byte per value, which holds while every outcome and status is
# below 128 (checked below); the tests round-trip every message through protobuf.
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ramster.v1 import tmem_pb2 as pb
from ramster.wire import PAGE_SIZE, Blob, Outcome, PageStatus

VARINT, I64, LEN, I32 = 0, 1, 2, 5
PUT_PAGES = (pb.PutBatchRequest.PAGES_FIELD_NUMBER,)
GET_PAGES = (pb.GetBatchResponse.PAGES_FIELD_NUMBER,)
STREAM_PUT_PAGES = (pb.StreamRequest.PUT_FIELD_NUMBER, *PUT_PAGES)
STREAM_GET_PAGES = (pb.StreamResponse.GET_FIELD_NUMBER, *GET_PAGES)
_OP_FIELDS = frozenset(f.number for f in pb.StreamRequest.DESCRIPTOR.oneofs_by_name["op"].fields)
_RESULT_FIELDS = frozenset(
    f.number for f in pb.StreamResponse.DESCRIPTOR.oneofs_by_name["result"].fields
)
_EMPTY = memoryview(b"")
assert max(Outcome) < 0x80 and max(PageStatus) < 0x80  # one varint byte each


@dataclass(frozen=True, slots=True)
class Parts:
    """A message as pieces to join once (`chunks`), and how many bytes they hold."""

    chunks: list[Blob]
    size: int

    @staticmethod
    def of(*chunks: bytes) -> Parts:
        return Parts(list(chunks), sum(len(c) for c in chunks))

    def __add__(self, other: Parts) -> Parts:
        return Parts(self.chunks + other.chunks, self.size + other.size)

    def join(self) -> bytes:
        return b"".join(self.chunks)


NO_PARTS = Parts([], 0)


def varint(value: int) -> bytes:
    """`value` (non-negative) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Per field in buf[pos:end]: (number, wire type, field start, value start, field end)."""
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos, end)
        number, kind = tag >> 3, tag & 7
        if kind == VARINT:
            value_start = pos
            _, pos = _read_varint(buf, pos, end)
        elif kind == LEN:
            size, value_start = _read_varint(buf, pos, end)
            pos = value_start + size
        elif kind in (I64, I32):
            value_start = pos
            pos += 8 if kind == I64 else 4
        else:
            raise DecodeError(f"unsupported wire type {kind} of field {number}")
        if number == 0 or pos > end:
            raise DecodeError("truncated message or field number 0")
        yield number, kind, start, value_start, pos


def _lift(
    buf: memoryview, pos: int, end: int, path: tuple[int, ...], siblings: frozenset[int]
) -> tuple[list[Blob], memoryview | None]:
    """buf[pos:end] without the bytes field at `path` (the parts to join), and that field's
    last value; another member of the outer field's oneof (`siblings`) drops what came before."""
    parts: list[Blob] = []
    found: memoryview | None = None
    for number, kind, start, value_start, stop in _fields(buf, pos, end):
        if number != path[0] or kind != LEN:
            if number in siblings:
                found = None
            parts.append(buf[start:stop])
        elif len(path) == 1:
            found = buf[value_start:stop]
        else:
            inner, inner_found = _lift(buf, value_start, stop, path[1:], frozenset())
            parts += [tag(number, LEN), varint(sum(len(p) for p in inner)), *inner]
            if inner_found is not None:
                found = inner_found
    return parts, found


def lift(
    raw: Blob, path: tuple[int, ...], siblings: frozenset[int] = frozenset()
) -> tuple[bytes, memoryview]:
    """(the message without its bytes field at `path`, that field's value as a view of `raw`)."""
    buf = memoryview(raw).cast("B")
    parts, found = _lift(buf, 0, buf.nbytes, path, siblings)
    return b"".join(parts), _EMPTY if found is None else found


def tag(number: int, kind: int) -> bytes:
    return varint(number << 3 | kind)


def _len_field(number: int, size: int) -> bytes:
    return tag(number, LEN) + varint(size)


# -- reading --------------------------------------------------------------------------------
def read_put_batch(raw: bytes) -> tuple[pb.PutBatchRequest, memoryview]:
    """A PutBatchRequest's keys (its pages field empty) and its pages, a view of `raw`."""
    rest, pages = lift(raw, PUT_PAGES)
    return pb.PutBatchRequest.FromString(rest), pages


def read_stream_request(raw: bytes) -> tuple[pb.StreamRequest, memoryview]:
    """A StreamRequest (a put's pages field empty) and a put's pages, a view of `raw` (empty
    for any other operation)."""
    rest, pages = lift(raw, STREAM_PUT_PAGES, _OP_FIELDS)
    request = pb.StreamRequest.FromString(rest)
    return request, pages if request.WhichOneof("op") == "put" else _EMPTY


def read_get_batch_reply(raw: bytes) -> tuple[pb.GetBatchResponse, memoryview]:
    """A GetBatchResponse's statuses (its pages field empty) and its pages, a view of `raw`."""
    rest, pages = lift(raw, GET_PAGES)
    return pb.GetBatchResponse.FromString(rest), pages


def read_stream_reply(raw: bytes) -> tuple[pb.StreamResponse, memoryview]:
    """A StreamResponse (a get's pages field empty) and a get's pages, a view of `raw`."""
    rest, pages = lift(raw, STREAM_GET_PAGES, _RESULT_FIELDS)
    reply = pb.StreamResponse.FromString(rest)
    return reply, pages if reply.WhichOneof("result") == "get" else _EMPTY


# -- writing --------------------------------------------------------------------------------
def _packed_small(number: int, values: Sequence[int]) -> Parts:
    """A packed repeated enum field whose values are all below 128 (one byte each)."""
    return Parts.of(_len_field(number, len(values)), bytes(values)) if values else NO_PARTS


def _pages(number: int, pages: Sequence[Blob]) -> Parts:
    """A bytes field of `pages` back to back, each exactly PAGE_SIZE bytes (as every page the
    engine gives and every checked page of a request is)."""
    return _joined(number, pages, len(pages) * PAGE_SIZE)


def blobs_field(number: int, blobs: Sequence[Blob]) -> Parts:
    """A bytes field of `blobs` (of any sizes) back to back."""
    return _joined(number, blobs, sum(len(blob) for blob in blobs))


def _joined(number: int, blobs: Sequence[Blob], size: int) -> Parts:
    if not blobs:
        return NO_PARTS
    head = _len_field(number, size)
    return Parts([head, *blobs], len(head) + size)


def put_batch_reply(outcomes: Sequence[int]) -> Parts:
    """A PutBatchResponse: one outcome per page."""
    return _packed_small(pb.PutBatchResponse.OUTCOMES_FIELD_NUMBER, outcomes)


def get_batch_reply(statuses: Sequence[int], hits: Sequence[Blob]) -> Parts:
    """A GetBatchResponse: one status per page, the hits' pages back to back."""
    return _packed_small(pb.GetBatchResponse.STATUSES_FIELD_NUMBER, statuses) + _pages(
        pb.GetBatchResponse.PAGES_FIELD_NUMBER, hits
    )


def put_batch_request(keys: pb.PutBatchRequest, pages: Sequence[Blob]) -> Parts:
    """A PutBatchRequest: its keys (encoded by protobuf: pool, oids, indexes), then its pages."""
    return Parts.of(keys.SerializeToString()) + _pages(pb.PutBatchRequest.PAGES_FIELD_NUMBER, pages)


def in_stream(request_id: int, field: int, body: Parts) -> Parts:
    """`body` as field `field` of a Stream message (request or reply) with id `request_id`."""
    head = tag(pb.StreamRequest.ID_FIELD_NUMBER, VARINT) + varint(request_id)
    return Parts.of(head, _len_field(field, body.size)) + body
