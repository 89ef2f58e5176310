from cbir.v1 import common_pb2 as _common_pb2
from cbir.v1 import duplicates_pb2 as _duplicates_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchByImageRequest(_message.Message):
    __slots__ = ("image", "k", "search_k", "min_score", "filter")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    search_k: int
    min_score: float
    filter: _common_pb2.Filter
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., search_k: _Optional[int] = ..., min_score: _Optional[float] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("embed_ms", "index_ms", "total_ms", "fetch_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    INDEX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    index_ms: float
    total_ms: float
    fetch_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., index_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., fetch_ms: _Optional[float] = ...) -> None: ...

class SearchByImageResponse(_message.Message):
    __slots__ = ("hits", "bundle_version", "timings")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    bundle_version: str
    timings: Timings
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class SearchByIdRequest(_message.Message):
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

class SearchByIdResponse(_message.Message):
    __slots__ = ("hits", "bundle_version", "timings")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    bundle_version: str
    timings: Timings
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class SearchByUrlRequest(_message.Message):
    __slots__ = ("url", "k", "search_k", "min_score", "filter")
    URL_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    url: str
    k: int
    search_k: int
    min_score: float
    filter: _common_pb2.Filter
    def __init__(self, url: _Optional[str] = ..., k: _Optional[int] = ..., search_k: _Optional[int] = ..., min_score: _Optional[float] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class SearchByUrlResponse(_message.Message):
    __slots__ = ("hits", "bundle_version", "timings", "image_bytes", "content_type")
    HITS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    bundle_version: str
    timings: Timings
    image_bytes: int
    content_type: str
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., image_bytes: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpstreamStatus(_message.Message):
    __slots__ = ("name", "target", "state", "detail", "channel", "tls")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: str
    state: str
    detail: str
    channel: str
    tls: bool
    def __init__(self, name: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., channel: _Optional[str] = ..., tls: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("upstreams", "model", "index", "compatible", "detail", "default_k", "max_k")
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPATIBLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    upstreams: _containers.RepeatedCompositeFieldContainer[UpstreamStatus]
    model: _common_pb2.ModelInfo
    index: _common_pb2.IndexInfo
    compatible: bool
    detail: str
    default_k: int
    max_k: int
    def __init__(self, upstreams: _Optional[_Iterable[_Union[UpstreamStatus, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., index: _Optional[_Union[_common_pb2.IndexInfo, _Mapping]] = ..., compatible: _Optional[bool] = ..., detail: _Optional[str] = ..., default_k: _Optional[int] = ..., max_k: _Optional[int] = ...) -> None: ...

class BatchQuery(_message.Message):
    __slots__ = ("image", "url", "item_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    url: str
    item_id: str
    def __init__(self, image: _Optional[bytes] = ..., url: _Optional[str] = ..., item_id: _Optional[str] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries", "k", "search_k", "min_score", "exclude_self", "filter")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SELF_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[BatchQuery]
    k: int
    search_k: int
    min_score: float
    exclude_self: bool
    filter: _common_pb2.Filter
    def __init__(self, queries: _Optional[_Iterable[_Union[BatchQuery, _Mapping]]] = ..., k: _Optional[int] = ..., search_k: _Optional[int] = ..., min_score: _Optional[float] = ..., exclude_self: _Optional[bool] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("hits", "error", "code")
    HITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    error: str
    code: str
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., error: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "bundle_version", "timings")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    bundle_version: str
    timings: Timings
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., bundle_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...
