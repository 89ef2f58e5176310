from cbir.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("images", "local_features", "mirrored", "regions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    local_features: bool
    mirrored: bool
    regions: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., local_features: _Optional[bool] = ..., mirrored: _Optional[bool] = ..., regions: _Optional[bool] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("vector", "error", "local_features", "local_features_mirrored", "regions")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_MIRRORED_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    vector: _common_pb2.Vector
    error: str
    local_features: bytes
    local_features_mirrored: bytes
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Vector]
    def __init__(self, vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., error: _Optional[str] = ..., local_features: _Optional[bytes] = ..., local_features_mirrored: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Vector, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results", "model_fingerprint")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedResult]
    model_fingerprint: str
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedResult, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
