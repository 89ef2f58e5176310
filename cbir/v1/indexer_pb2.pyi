from cbir.v1 import common_pb2 as _common_pb2
from cbir.v1 import duplicates_pb2 as _duplicates_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryVectorRequest(_message.Message):
    __slots__ = ("vector", "k", "search_k", "model_fingerprint", "local_features", "local_features_mirrored", "min_score", "regions", "filter")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_MIRRORED_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    vector: _common_pb2.Vector
    k: int
    search_k: int
    model_fingerprint: str
    local_features: bytes
    local_features_mirrored: bytes
    min_score: float
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Vector]
    filter: _common_pb2.Filter
    def __init__(self, vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., k: _Optional[int] = ..., search_k: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., local_features: _Optional[bytes] = ..., local_features_mirrored: _Optional[bytes] = ..., min_score: _Optional[float] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Vector, _Mapping]]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class QueryVectorResponse(_message.Message):
    __slots__ = ("hits", "bundle_version")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    bundle_version: str
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class QueryItemRequest(_message.Message):
    __slots__ = ("item_id", "k", "search_k", "exclude_self", "min_score", "filter")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SELF_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    search_k: int
    exclude_self: bool
    min_score: float
    filter: _common_pb2.Filter
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., search_k: _Optional[int] = ..., exclude_self: _Optional[bool] = ..., min_score: _Optional[float] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class QueryItemResponse(_message.Message):
    __slots__ = ("hits", "bundle_version")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    bundle_version: str
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.Item]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.Item, _Mapping]]] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexInfoResponse(_message.Message):
    __slots__ = ("index", "deleted_items", "deleted_list")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DELETED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DELETED_LIST_FIELD_NUMBER: _ClassVar[int]
    index: _common_pb2.IndexInfo
    deleted_items: int
    deleted_list: str
    def __init__(self, index: _Optional[_Union[_common_pb2.IndexInfo, _Mapping]] = ..., deleted_items: _Optional[int] = ..., deleted_list: _Optional[str] = ...) -> None: ...

class ReloadBundleRequest(_message.Message):
    __slots__ = ("version", "allow_model_change")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MODEL_CHANGE_FIELD_NUMBER: _ClassVar[int]
    version: str
    allow_model_change: bool
    def __init__(self, version: _Optional[str] = ..., allow_model_change: _Optional[bool] = ...) -> None: ...

class ReloadBundleResponse(_message.Message):
    __slots__ = ("reloaded", "bundle_version", "previous_version", "item_count", "deleted_items", "seconds")
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DELETED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    reloaded: bool
    bundle_version: str
    previous_version: str
    item_count: int
    deleted_items: int
    seconds: float
    def __init__(self, reloaded: _Optional[bool] = ..., bundle_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., item_count: _Optional[int] = ..., deleted_items: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
