from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Owner(_message.Message):
    __slots__ = ("node_id", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: str
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sender",)
    SENDER_FIELD_NUMBER: _ClassVar[int]
    sender: Owner
    def __init__(self, sender: _Optional[_Union[Owner, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("node_id", "incarnation", "free_bytes", "leaving")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: str
    free_bytes: int
    leaving: bool
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., free_bytes: _Optional[int] = ..., leaving: _Optional[bool] = ...) -> None: ...

class PutZpagesRequest(_message.Message):
    __slots__ = ("owner", "epoch", "pool_id", "zpages", "sizes", "oids", "indices")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ZPAGES_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    epoch: int
    pool_id: int
    zpages: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    oids: _containers.RepeatedScalarFieldContainer[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., epoch: _Optional[int] = ..., pool_id: _Optional[int] = ..., zpages: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ..., oids: _Optional[_Iterable[int]] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class PutZpagesResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetZpagesRequest(_message.Message):
    __slots__ = ("owner", "epoch", "pool_id", "oids", "indices")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    epoch: int
    pool_id: int
    oids: _containers.RepeatedScalarFieldContainer[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., epoch: _Optional[int] = ..., pool_id: _Optional[int] = ..., oids: _Optional[_Iterable[int]] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class GetZpagesResponse(_message.Message):
    __slots__ = ("zpages", "sizes")
    ZPAGES_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    zpages: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, zpages: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class FlushZpagesRequest(_message.Message):
    __slots__ = ("owner", "epochs", "pool_ids", "oids", "indices")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    POOL_IDS_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    epochs: _containers.RepeatedScalarFieldContainer[int]
    pool_ids: _containers.RepeatedScalarFieldContainer[int]
    oids: _containers.RepeatedScalarFieldContainer[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., epochs: _Optional[_Iterable[int]] = ..., pool_ids: _Optional[_Iterable[int]] = ..., oids: _Optional[_Iterable[int]] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class FlushZpagesResponse(_message.Message):
    __slots__ = ("flushed",)
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    flushed: int
    def __init__(self, flushed: _Optional[int] = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("owner", "epoch")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    epoch: int
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReclaimChunk(_message.Message):
    __slots__ = ("pool_ids", "oids", "indices")
    POOL_IDS_FIELD_NUMBER: _ClassVar[int]
    OIDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    pool_ids: _containers.RepeatedScalarFieldContainer[int]
    oids: _containers.RepeatedScalarFieldContainer[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pool_ids: _Optional[_Iterable[int]] = ..., oids: _Optional[_Iterable[int]] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...
