from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("dimension", "data")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    data: bytes
    def __init__(self, dimension: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "feature", "dimension", "weights_source", "weights_fingerprint", "preprocessing", "fingerprint", "pooling", "local_features", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    feature: str
    dimension: int
    weights_source: str
    weights_fingerprint: str
    preprocessing: str
    fingerprint: str
    pooling: str
    local_features: str
    precision: str
    def __init__(self, name: _Optional[str] = ..., feature: _Optional[str] = ..., dimension: _Optional[int] = ..., weights_source: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., preprocessing: _Optional[str] = ..., fingerprint: _Optional[str] = ..., pooling: _Optional[str] = ..., local_features: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "url", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    url: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., url: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("item_id", "url", "distance", "score", "metadata", "inliers", "match")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    url: str
    distance: float
    score: float
    metadata: _containers.ScalarMap[str, str]
    inliers: int
    match: str
    def __init__(self, item_id: _Optional[str] = ..., url: _Optional[str] = ..., distance: _Optional[float] = ..., score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., inliers: _Optional[int] = ..., match: _Optional[str] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("item_count", "dimension", "input_dimension", "metric", "trees", "model_fingerprint", "model", "bundle_version", "bundle_path", "created_at", "pca_dimension", "pca_whiten", "default_search_k", "local_features", "verify_top", "index_type")
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PCA_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PCA_WHITEN_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TOP_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    item_count: int
    dimension: int
    input_dimension: int
    metric: str
    trees: int
    model_fingerprint: str
    model: ModelInfo
    bundle_version: str
    bundle_path: str
    created_at: str
    pca_dimension: int
    pca_whiten: bool
    default_search_k: int
    local_features: str
    verify_top: int
    index_type: str
    def __init__(self, item_count: _Optional[int] = ..., dimension: _Optional[int] = ..., input_dimension: _Optional[int] = ..., metric: _Optional[str] = ..., trees: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., bundle_version: _Optional[str] = ..., bundle_path: _Optional[str] = ..., created_at: _Optional[str] = ..., pca_dimension: _Optional[int] = ..., pca_whiten: _Optional[bool] = ..., default_search_k: _Optional[int] = ..., local_features: _Optional[str] = ..., verify_top: _Optional[int] = ..., index_type: _Optional[str] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "equals", "one_of", "number", "date")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ONE_OF_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    field: str
    equals: str
    one_of: ValueSet
    number: Range
    date: Range
    def __init__(self, field: _Optional[str] = ..., equals: _Optional[str] = ..., one_of: _Optional[_Union[ValueSet, _Mapping]] = ..., number: _Optional[_Union[Range, _Mapping]] = ..., date: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class ValueSet(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("min", "max", "min_exclusive", "max_exclusive")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    min: str
    max: str
    min_exclusive: bool
    max_exclusive: bool
    def __init__(self, min: _Optional[str] = ..., max: _Optional[str] = ..., min_exclusive: _Optional[bool] = ..., max_exclusive: _Optional[bool] = ...) -> None: ...
