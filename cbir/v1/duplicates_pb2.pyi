from cbir.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FindDuplicatesRequest(_message.Message):
    __slots__ = ("match_class", "threshold", "k", "limit", "verify_top", "search_k")
    MATCH_CLASS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TOP_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    match_class: str
    threshold: float
    k: int
    limit: int
    verify_top: int
    search_k: int
    def __init__(self, match_class: _Optional[str] = ..., threshold: _Optional[float] = ..., k: _Optional[int] = ..., limit: _Optional[int] = ..., verify_top: _Optional[int] = ..., search_k: _Optional[int] = ...) -> None: ...

class FindDuplicatesResponse(_message.Message):
    __slots__ = ("progress", "group", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: DuplicateProgress
    group: DuplicateGroup
    summary: DuplicateSummary
    def __init__(self, progress: _Optional[_Union[DuplicateProgress, _Mapping]] = ..., group: _Optional[_Union[DuplicateGroup, _Mapping]] = ..., summary: _Optional[_Union[DuplicateSummary, _Mapping]] = ...) -> None: ...

class DuplicateProgress(_message.Message):
    __slots__ = ("items_searched", "items_total", "pairs_found")
    ITEMS_SEARCHED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FOUND_FIELD_NUMBER: _ClassVar[int]
    items_searched: int
    items_total: int
    pairs_found: int
    def __init__(self, items_searched: _Optional[int] = ..., items_total: _Optional[int] = ..., pairs_found: _Optional[int] = ...) -> None: ...

class DuplicateGroup(_message.Message):
    __slots__ = ("number", "items", "pairs")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    number: int
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.Item]
    pairs: _containers.RepeatedCompositeFieldContainer[DuplicatePair]
    def __init__(self, number: _Optional[int] = ..., items: _Optional[_Iterable[_Union[_common_pb2.Item, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[DuplicatePair, _Mapping]]] = ...) -> None: ...

class DuplicatePair(_message.Message):
    __slots__ = ("item_a", "item_b", "score", "inliers", "match", "decided_by", "pdq_distance")
    ITEM_A_FIELD_NUMBER: _ClassVar[int]
    ITEM_B_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    PDQ_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    item_a: str
    item_b: str
    score: float
    inliers: int
    match: str
    decided_by: str
    pdq_distance: int
    def __init__(self, item_a: _Optional[str] = ..., item_b: _Optional[str] = ..., score: _Optional[float] = ..., inliers: _Optional[int] = ..., match: _Optional[str] = ..., decided_by: _Optional[str] = ..., pdq_distance: _Optional[int] = ...) -> None: ...

class DuplicateSummary(_message.Message):
    __slots__ = ("groups", "groups_sent", "pairs", "items_in_groups", "items_searched", "deleted_left_out", "seconds", "bundle_version")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_SENT_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_IN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_SEARCHED_FIELD_NUMBER: _ClassVar[int]
    DELETED_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    groups: int
    groups_sent: int
    pairs: int
    items_in_groups: int
    items_searched: int
    deleted_left_out: int
    seconds: float
    bundle_version: str
    def __init__(self, groups: _Optional[int] = ..., groups_sent: _Optional[int] = ..., pairs: _Optional[int] = ..., items_in_groups: _Optional[int] = ..., items_searched: _Optional[int] = ..., deleted_left_out: _Optional[int] = ..., seconds: _Optional[float] = ..., bundle_version: _Optional[str] = ...) -> None: ...
