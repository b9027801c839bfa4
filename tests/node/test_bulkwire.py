# ramster/bulkwire.py reads and writes the bulk messages without protobuf objects: what it reads
# must be what protobuf would parse (whatever legal shape the bytes have), what it writes must
# parse back to the same message, and bytes that do not parse fail as protobuf's would.
from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from ramster import bulkwire
from ramster.v1 import tmem_pb2 as pb

PAGES = [os.urandom(4096) for _ in range(3)]
BLOB = b"".join(PAGES)


def field(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return bulkwire.tag(number, bulkwire.LEN) + bulkwire.varint(len(body)) + body


def test_reads_a_stream_put_as_protobuf_does() -> None:
    put = pb.PutBatchRequest(pool=3, oids=[9], indexes=[4, 5, 6], pages=BLOB)
    raw = pb.StreamRequest(id=300, put=put).SerializeToString()
    request, pages = bulkwire.read_stream_request(raw)
    assert bytes(pages) == BLOB
    assert request.put.pages == b""
    request.put.pages = BLOB
    assert request == pb.StreamRequest.FromString(raw)


def test_a_repeated_field_merges_and_the_last_pages_win() -> None:
    first = pb.PutBatchRequest(pool=3, indexes=[1], pages=PAGES[0]).SerializeToString()
    second = pb.PutBatchRequest(oids=[9], pages=PAGES[1]).SerializeToString()
    raw = bulkwire.tag(1, bulkwire.VARINT) + bulkwire.varint(5) + field(2, first) + field(2, second)
    request, pages = bulkwire.read_stream_request(raw)
    parsed = pb.StreamRequest.FromString(raw)
    assert bytes(pages) == parsed.put.pages == PAGES[1]
    assert (request.put.pool, list(request.put.oids), list(request.put.indexes)) == (3, [9], [1])


def test_another_operation_after_a_put_leaves_no_pages() -> None:
    put = pb.StreamRequest(put=pb.PutBatchRequest(pool=1, indexes=[1], pages=PAGES[0]))
    get = pb.StreamRequest(id=2, get=pb.GetBatchRequest(pool=1, indexes=[1]))
    raw = put.SerializeToString() + get.SerializeToString()  # concatenated messages merge
    request, pages = bulkwire.read_stream_request(raw)
    assert request.WhichOneof("op") == "get" and pages.nbytes == 0
    assert request == pb.StreamRequest.FromString(raw)


def test_unpacked_keys_and_unknown_fields_keep_protobuf_semantics() -> None:
    keys = b"".join(bulkwire.tag(3, bulkwire.VARINT) + bulkwire.varint(i) for i in (7, 8, 9))
    unknown = field(99, b"future") + bulkwire.tag(98, bulkwire.I32) + b"\x01\x02\x03\x04"
    raw = keys + field(4, BLOB) + unknown
    request, pages = bulkwire.read_put_batch(raw)
    assert list(request.indexes) == [7, 8, 9] and bytes(pages) == BLOB
    assert request.SerializeToString().endswith(unknown)


@pytest.mark.parametrize(
    "raw",
    [
        field(4, BLOB)[:-1],  # the pages run past the end
        b"\x80",  # a varint cut short
        b"\x00\x01",  # field number 0
        bulkwire.tag(4, 3) + b"x",  # a group (wire type 3)
        b"\xff" * 11,  # a varint longer than 64 bits
    ],
)
def test_malformed_bytes_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        bulkwire.read_put_batch(raw)
    with pytest.raises(DecodeError):
        bulkwire.read_stream_request(field(2, raw))


def test_written_messages_parse_back() -> None:
    keys = pb.PutBatchRequest(pool=2, oids=[1], indexes=[0, 1, 2])
    raw = bulkwire.in_stream(7, 2, bulkwire.put_batch_request(keys, PAGES)).join()
    keys.pages = BLOB
    assert pb.StreamRequest.FromString(raw) == pb.StreamRequest(id=7, put=keys)

    statuses = [pb.PAGE_STATUS_HIT, pb.PAGE_STATUS_MISS, pb.PAGE_STATUS_HIT]
    written = bulkwire.in_stream(2**40, 3, bulkwire.get_batch_reply(statuses, PAGES[:2]))
    get = written.join()
    assert written.size == len(get)
    reply = pb.StreamResponse(
        id=2**40, get=pb.GetBatchResponse(statuses=statuses, pages=BLOB[:8192])
    )
    assert pb.StreamResponse.FromString(get) == reply
    reply, pages = bulkwire.read_stream_reply(get)
    assert list(reply.get.statuses) == statuses and bytes(pages) == BLOB[:8192]

    outcomes = [pb.PUT_OUTCOME_STORED, pb.PUT_OUTCOME_REFUSED_NO_ROOM]
    put = bulkwire.put_batch_reply(outcomes).join()
    assert list(pb.PutBatchResponse.FromString(put).outcomes) == outcomes
    assert bulkwire.get_batch_reply([], []).join() == b""  # proto3 leaves empty fields out


def test_varints() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        raw = bulkwire.tag(1, bulkwire.VARINT) + bulkwire.varint(value)
        assert pb.FlushObjectRequest.FromString(raw).pool == value
