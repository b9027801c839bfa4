# The transport writes a put's request as bytes (node.peering.put_request): a holder must parse
# from them exactly the PutZpagesRequest that protobuf would have written.
from __future__ import annotations

import os

from node.peering import put_request
from ramster.remote.table import slot_of
from ramster.v1 import peer_pb2 as pb


def test_a_written_put_request_is_the_message_protobuf_writes() -> None:
    owner = pb.Owner(node_id="n1", incarnation="i" * 32)
    blobs = [os.urandom(n) for n in (1, 127, 128, 1450, 4096, 20000)]
    locations = [3 << 32 | 7, 9, 1 << 40 | 5, 2, 0xFFFFFFFF, 70000]
    written = put_request(owner, 300, 17, blobs, locations)
    assert pb.PutZpagesRequest.FromString(written) == pb.PutZpagesRequest(
        owner=owner,
        epoch=300,
        pool_id=17,
        zpages=b"".join(blobs),
        sizes=[len(blob) for blob in blobs],
        slots=[slot_of(location) for location in locations],
    )
    assert pb.PutZpagesRequest.FromString(put_request(owner, 1, 2, [], [])) == (
        pb.PutZpagesRequest(owner=owner, epoch=1, pool_id=2)
    )
