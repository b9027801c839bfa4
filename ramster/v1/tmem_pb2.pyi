from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_KIND_UNSPECIFIED: _ClassVar[PoolKind]
    POOL_KIND_PERSISTENT: _ClassVar[PoolKind]
    POOL_KIND_EPHEMERAL: _ClassVar[PoolKind]

class PutOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_OUTCOME_UNSPECIFIED: _ClassVar[PutOutcome]
    PUT_OUTCOME_STORED: _ClassVar[PutOutcome]
    PUT_OUTCOME_SAME_FILLED: _ClassVar[PutOutcome]
    PUT_OUTCOME_STORED_RAW: _ClassVar[PutOutcome]
    PUT_OUTCOME_REFUSED_POOR_COMPRESSION: _ClassVar[PutOutcome]
    PUT_OUTCOME_REFUSED_NO_ROOM: _ClassVar[PutOutcome]

class PageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_STATUS_UNSPECIFIED: _ClassVar[PageStatus]
    PAGE_STATUS_HIT: _ClassVar[PageStatus]
    PAGE_STATUS_MISS: _ClassVar[PageStatus]
    PAGE_STATUS_CORRUPT: _ClassVar[PageStatus]
    PAGE_STATUS_UNAVAILABLE: _ClassVar[PageStatus]
POOL_KIND_UNSPECIFIED: PoolKind
POOL_KIND_PERSISTENT: PoolKind
POOL_KIND_EPHEMERAL: PoolKind
PUT_OUTCOME_UNSPECIFIED: PutOutcome
PUT_OUTCOME_STORED: PutOutcome
PUT_OUTCOME_SAME_FILLED: PutOutcome
PUT_OUTCOME_STORED_RAW: PutOutcome
PUT_OUTCOME_REFUSED_POOR_COMPRESSION: PutOutcome
PUT_OUTCOME_REFUSED_NO_ROOM: PutOutcome
PAGE_STATUS_UNSPECIFIED: PageStatus
PAGE_STATUS_HIT: PageStatus
PAGE_STATUS_MISS: PageStatus
PAGE_STATUS_CORRUPT: PageStatus
PAGE_STATUS_UNAVAILABLE: PageStatus

class CreatePoolRequest(_message.Message):
    __slots__ = ("kind", "allocator")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALLOCATOR_FIELD_NUMBER: _ClassVar[int]
    kind: PoolKind
    allocator: str
    def __init__(self, kind: _Optional[_Union[PoolKind, str]] = ..., allocator: _Optional[str] = ...) -> None: ...

class CreatePoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: int
    def __init__(self, pool: _Optional[int] = ...) -> None: ...

class DestroyPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: int
    def __init__(self, pool: _Optional[int] = ...) -> None: ...

class DestroyPoolResponse(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    def __init__(self, pages: _Optional[int] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("pool", "kind", "allocator", "pages")
    POOL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALLOCATOR_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pool: int
    kind: PoolKind
    allocator: str
    pages: int
    def __init__(self, pool: _Optional[int] = ..., kind: _Optional[_Union[PoolKind, str]] = ..., allocator: _Optional[str] = ..., pages: _Optional[int] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("pool", "oid", "index", "page")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oid: int
    index: int
    page: bytes
    def __init__(self, pool: _Optional[int] = ..., oid: _Optional[int] = ..., index: _Optional[int] = ..., page: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: PutOutcome
    def __init__(self, outcome: _Optional[_Union[PutOutcome, str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("pool", "oid", "index", "exclusive")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oid: int
    index: int
    exclusive: bool
    def __init__(self, pool: _Optional[int] = ..., oid: _Optional[int] = ..., index: _Optional[int] = ..., exclusive: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("status", "page")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    status: PageStatus
    page: bytes
    def __init__(self, status: _Optional[_Union[PageStatus, str]] = ..., page: _Optional[bytes] = ...) -> None: ...

class FlushPageRequest(_message.Message):
    __slots__ = ("pool", "oid", "index")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oid: int
    index: int
    def __init__(self, pool: _Optional[int] = ..., oid: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class FlushPageResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class FlushObjectRequest(_message.Message):
    __slots__ = ("pool", "oid")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OID_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oid: int
    def __init__(self, pool: _Optional[int] = ..., oid: _Optional[int] = ...) -> None: ...

class FlushObjectResponse(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    def __init__(self, pages: _Optional[int] = ...) -> None: ...

class PutBatchRequest(_message.Message):
    __slots__ = ("pool", "oids", "indexes", "pages")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oids: _containers.RepeatedScalarFieldContainer[int]
    indexes: _containers.RepeatedScalarFieldContainer[int]
    pages: bytes
    def __init__(self, pool: _Optional[int] = ..., oids: _Optional[_Iterable[int]] = ..., indexes: _Optional[_Iterable[int]] = ..., pages: _Optional[bytes] = ...) -> None: ...

class PutBatchResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedScalarFieldContainer[PutOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[PutOutcome, str]]] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("pool", "oids", "indexes", "exclusive")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    pool: int
    oids: _containers.RepeatedScalarFieldContainer[int]
    indexes: _containers.RepeatedScalarFieldContainer[int]
    exclusive: bool
    def __init__(self, pool: _Optional[int] = ..., oids: _Optional[_Iterable[int]] = ..., indexes: _Optional[_Iterable[int]] = ..., exclusive: _Optional[bool] = ...) -> None: ...

class GetBatchResponse(_message.Message):
    __slots__ = ("statuses", "pages")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[PageStatus]
    pages: bytes
    def __init__(self, statuses: _Optional[_Iterable[_Union[PageStatus, str]]] = ..., pages: _Optional[bytes] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("id", "put", "get", "flush_page", "flush_object")
    ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    FLUSH_PAGE_FIELD_NUMBER: _ClassVar[int]
    FLUSH_OBJECT_FIELD_NUMBER: _ClassVar[int]
    id: int
    put: PutBatchRequest
    get: GetBatchRequest
    flush_page: FlushPageRequest
    flush_object: FlushObjectRequest
    def __init__(self, id: _Optional[int] = ..., put: _Optional[_Union[PutBatchRequest, _Mapping]] = ..., get: _Optional[_Union[GetBatchRequest, _Mapping]] = ..., flush_page: _Optional[_Union[FlushPageRequest, _Mapping]] = ..., flush_object: _Optional[_Union[FlushObjectRequest, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("id", "put", "get", "flush_page", "flush_object", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    FLUSH_PAGE_FIELD_NUMBER: _ClassVar[int]
    FLUSH_OBJECT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    put: PutBatchResponse
    get: GetBatchResponse
    flush_page: FlushPageResponse
    flush_object: FlushObjectResponse
    error: Error
    def __init__(self, id: _Optional[int] = ..., put: _Optional[_Union[PutBatchResponse, _Mapping]] = ..., get: _Optional[_Union[GetBatchResponse, _Mapping]] = ..., flush_page: _Optional[_Union[FlushPageResponse, _Mapping]] = ..., flush_object: _Optional[_Union[FlushObjectResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node_id", "version", "pool_limit_bytes", "pool_size_bytes", "stored_pages", "zpages", "pages_per_frame", "puts", "gets", "hits", "misses", "duplicate_puts", "flushes", "corrupt", "compacted_frames", "put_outcomes", "pools", "unavailable", "written_back_pages", "remote_pages", "remote_outbox", "foreign_pages", "peers_up", "peers", "rereplicated_pages", "remote_lost_pages")
    class PutOutcomesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_PAGES_FIELD_NUMBER: _ClassVar[int]
    ZPAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_PUTS_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PUT_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BACK_PAGES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PAGES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_OUTBOX_FIELD_NUMBER: _ClassVar[int]
    FOREIGN_PAGES_FIELD_NUMBER: _ClassVar[int]
    PEERS_UP_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REREPLICATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LOST_PAGES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    pool_limit_bytes: int
    pool_size_bytes: int
    stored_pages: int
    zpages: int
    pages_per_frame: float
    puts: int
    gets: int
    hits: int
    misses: int
    duplicate_puts: int
    flushes: int
    corrupt: int
    compacted_frames: int
    put_outcomes: _containers.ScalarMap[str, int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    unavailable: int
    written_back_pages: int
    remote_pages: int
    remote_outbox: int
    foreign_pages: int
    peers_up: int
    peers: int
    rereplicated_pages: int
    remote_lost_pages: int
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., pool_limit_bytes: _Optional[int] = ..., pool_size_bytes: _Optional[int] = ..., stored_pages: _Optional[int] = ..., zpages: _Optional[int] = ..., pages_per_frame: _Optional[float] = ..., puts: _Optional[int] = ..., gets: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., duplicate_puts: _Optional[int] = ..., flushes: _Optional[int] = ..., corrupt: _Optional[int] = ..., compacted_frames: _Optional[int] = ..., put_outcomes: _Optional[_Mapping[str, int]] = ..., pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ..., unavailable: _Optional[int] = ..., written_back_pages: _Optional[int] = ..., remote_pages: _Optional[int] = ..., remote_outbox: _Optional[int] = ..., foreign_pages: _Optional[int] = ..., peers_up: _Optional[int] = ..., peers: _Optional[int] = ..., rereplicated_pages: _Optional[int] = ..., remote_lost_pages: _Optional[int] = ...) -> None: ...
