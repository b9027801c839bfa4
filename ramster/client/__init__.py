# ramster.client: talk to RAMster nodes over gRPC.
#
#     from ramster.client import Client
#     with Client("127.0.0.1:7070") as node:
#         pool = node.create_pool("persistent")
#         node.put_many(pool, oid=7, start=0, pages=pages)
#         result = node.get_many(pool, oid=7, start=0, count=len(pages))
#
# AsyncClient is the asyncio original (with the pipelined stream); Client wraps it for blocking
# code.  Every call has a deadline and raises RamsterError subclasses named for the gRPC status.
from ramster.client.aio import AsyncClient, PoolInfo, Stream
from ramster.client.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PageUnavailable,
    RamsterError,
    ResourceExhausted,
    Unavailable,
)
from ramster.client.messages import GetResult, KeyRange
from ramster.client.sync import Client
from ramster.wire import MAX_BATCH_PAGES, PAGE_SIZE, Outcome, PageStatus

__all__ = [
    "MAX_BATCH_PAGES",
    "PAGE_SIZE",
    "AsyncClient",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "GetResult",
    "InvalidArgument",
    "KeyRange",
    "NotFound",
    "Outcome",
    "PageStatus",
    "PageUnavailable",
    "PoolInfo",
    "RamsterError",
    "ResourceExhausted",
    "Stream",
    "Unavailable",
]
