# ramster.zcache: the unforked, synchronous compressed page cache every node embeds.
#
# Pure library: no sockets, no asyncio, no gRPC, no metrics.  The ramster layer and the node
# daemon extend it only through its public interface (and, from the reaper on, evictors); they
# read it through ZCache.snapshot() and its narrow methods, never its pools or allocators.
from ramster.zcache.cache import ABSENT, STORED, ZCache
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
from ramster.zcache.halves import Encodings, PageEncoder, SealedPages
from ramster.zcache.pool import PoolSpec
from ramster.zcache.snapshot import PoolView, Snapshot
from ramster.zcache.validate import MAX_INDEX, MAX_OID, MAX_POOL_ID, check_keys, check_put_batch

__all__ = [
    "ABSENT",
    "ALLOCATORS",
    "MAX_INDEX",
    "MAX_OID",
    "MAX_POOL_ID",
    "PAGE_SIZE",
    "STORED",
    "CorruptPage",
    "Encodings",
    "InvalidConfig",
    "InvalidKey",
    "InvalidPage",
    "PageEncoder",
    "PageError",
    "PageUnavailable",
    "PoolKind",
    "PoolSpec",
    "PoolView",
    "PutResult",
    "SealedPages",
    "Snapshot",
    "UnknownPool",
    "ZCache",
    "ZCacheConfig",
    "ZCacheError",
    "check_keys",
    "check_put_batch",
]
