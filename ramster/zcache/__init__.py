# ramster.zcache: the unforked, synchronous compressed page cache every node embeds.
#
# Pure library: no sockets, no asyncio, no gRPC, no metrics.  The ramster layer and the node
# daemon extend it only through its public interface (and, from the reaper on, evictors).
from ramster.zcache.cache import PoolSpec, ZCache
from ramster.zcache.codec import PAGE_SIZE
from ramster.zcache.config import ALLOCATORS, PoolKind, PutResult, ZCacheConfig
from ramster.zcache.errors import (
    CorruptPage,
    InvalidConfig,
    InvalidKey,
    InvalidPage,
    PageError,
    PageUnavailable,
    UnknownPool,
    ZCacheError,
)

__all__ = [
    "ALLOCATORS",
    "PAGE_SIZE",
    "CorruptPage",
    "InvalidConfig",
    "InvalidKey",
    "InvalidPage",
    "PageError",
    "PageUnavailable",
    "PoolKind",
    "PoolSpec",
    "PutResult",
    "UnknownPool",
    "ZCache",
    "ZCacheConfig",
    "ZCacheError",
]
