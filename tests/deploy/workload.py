# A client workload for the compose test, spoken straight to the ramster.v1.Tmem API (the node's
# published contract) from the host through a published port, over TLS with the cluster CA and
# a tenant's bearer token.
#
# Every page is a real page from tests/data/sample.pages (cycled) with its own key stamped into
# its first 16 bytes, so no two stored pages are equal and a reply with the wrong page cannot
# pass verification.  Pages go in batches to one persistent pool; the pages the node accepted
# (stored, same-filled or stored raw) are the ones it owes back, and verify() reads all of them
# back in batches and compares every byte.  Refused pages (poor compression, no room) are
# reported, not verified: the node never promised to keep them.
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from ramster.v1 import tmem_pb2 as pb
from ramster.v1 import tmem_pb2_grpc as pb_grpc

PAGE_SIZE = 4096
BATCH = 512
RPC_TIMEOUT = 60.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
ACCEPTED = {pb.PUT_OUTCOME_STORED, pb.PUT_OUTCOME_SAME_FILLED, pb.PUT_OUTCOME_STORED_RAW}


def stamped(page: bytes, key: int) -> bytes:
    return key.to_bytes(16, "little") + page[16:]


@dataclass
class Workload:
    target: str
    pages: list[bytes]
    count: int
    ca: bytes
    token: str
    oid: int = 7
    pool: int = -1
    accepted: list[int] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def channel(self) -> grpc.Channel:
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.ca), grpc.access_token_call_credentials(self.token)
        )
        return grpc.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)

    def page(self, index: int) -> bytes:
        return stamped(self.pages[index % len(self.pages)], index)

    def put(self) -> None:
        with self.channel() as channel:
            stub = pb_grpc.TmemStub(channel)
            reply = stub.CreatePool(
                pb.CreatePoolRequest(kind=pb.POOL_KIND_PERSISTENT), timeout=RPC_TIMEOUT
            )
            self.pool = reply.pool
            for start in range(0, self.count, BATCH):
                indexes = list(range(start, min(self.count, start + BATCH)))
                request = pb.PutBatchRequest(
                    pool=self.pool,
                    oids=[self.oid],
                    indexes=indexes,
                    pages=b"".join(self.page(i) for i in indexes),
                )
                put = stub.PutBatch(request, timeout=RPC_TIMEOUT)
                assert len(put.outcomes) == len(indexes)
                for index, outcome in zip(indexes, put.outcomes, strict=True):
                    name = pb.PutOutcome.Name(outcome)
                    self.outcomes[name] = self.outcomes.get(name, 0) + 1
                    if outcome in ACCEPTED:
                        self.accepted.append(index)

    def verify(self) -> list[str]:
        """Read back every accepted page; the list of what was wrong (empty when all match)."""
        problems: list[str] = []
        with self.channel() as channel:
            stub = pb_grpc.TmemStub(channel)
            for start in range(0, len(self.accepted), BATCH):
                indexes = self.accepted[start : start + BATCH]
                reply = stub.GetBatch(
                    pb.GetBatchRequest(pool=self.pool, oids=[self.oid], indexes=indexes),
                    timeout=RPC_TIMEOUT,
                )
                hits = iter(range(0, len(reply.pages), PAGE_SIZE))
                for index, status in zip(indexes, reply.statuses, strict=True):
                    if status != pb.PAGE_STATUS_HIT:
                        problems.append(f"page {index}: {pb.PageStatus.Name(status)}")
                        continue
                    offset = next(hits)
                    if reply.pages[offset : offset + PAGE_SIZE] != self.page(index):
                        problems.append(f"page {index}: wrong bytes")
        return problems
