from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureValue(_message.Message):
    __slots__ = ("number", "text", "numbers")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    number: float
    text: str
    numbers: NumberList
    def __init__(self, number: _Optional[float] = ..., text: _Optional[str] = ..., numbers: _Optional[_Union[NumberList, _Mapping]] = ...) -> None: ...

class NumberList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "user_features", "ratings", "k", "n_candidates", "include_seen", "exclude_items", "include_items", "genres", "sources")
    class UserFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    class RatingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    N_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    user_features: _containers.MessageMap[str, FeatureValue]
    ratings: _containers.ScalarMap[str, float]
    k: int
    n_candidates: int
    include_seen: bool
    exclude_items: _containers.RepeatedScalarFieldContainer[str]
    include_items: _containers.RepeatedScalarFieldContainer[str]
    genres: _containers.RepeatedScalarFieldContainer[str]
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., user_features: _Optional[_Mapping[str, FeatureValue]] = ..., ratings: _Optional[_Mapping[str, float]] = ..., k: _Optional[int] = ..., n_candidates: _Optional[int] = ..., include_seen: _Optional[bool] = ..., exclude_items: _Optional[_Iterable[str]] = ..., include_items: _Optional[_Iterable[str]] = ..., genres: _Optional[_Iterable[str]] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "sources", "title")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    sources: _containers.RepeatedScalarFieldContainer[str]
    title: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., sources: _Optional[_Iterable[str]] = ..., title: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "version", "candidates", "served_by")
    class CandidatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    version: str
    candidates: _containers.ScalarMap[str, int]
    served_by: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., version: _Optional[str] = ..., candidates: _Optional[_Mapping[str, int]] = ..., served_by: _Optional[str] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("user_ids", "options")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    options: RecommendRequest
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[RecommendRequest, _Mapping]] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("results", "version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecommendResponse]
    version: str
    def __init__(self, results: _Optional[_Iterable[_Union[RecommendResponse, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "user_features", "ratings", "item_ids")
    class UserFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    class RatingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    user_features: _containers.MessageMap[str, FeatureValue]
    ratings: _containers.ScalarMap[str, float]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., user_features: _Optional[_Mapping[str, FeatureValue]] = ..., ratings: _Optional[_Mapping[str, float]] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("items", "version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class NewItem(_message.Message):
    __slots__ = ("item_id", "features", "title")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    features: _containers.MessageMap[str, FeatureValue]
    title: str
    def __init__(self, item_id: _Optional[str] = ..., features: _Optional[_Mapping[str, FeatureValue]] = ..., title: _Optional[str] = ...) -> None: ...

class AddItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[NewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[NewItem, _Mapping]]] = ...) -> None: ...

class AddItemsResponse(_message.Message):
    __slots__ = ("n_items", "version")
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    n_items: int
    version: str
    def __init__(self, n_items: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("reloaded", "version", "previous_version", "message")
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reloaded: bool
    version: str
    previous_version: str
    message: str
    def __init__(self, reloaded: _Optional[bool] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "factory", "metric", "n_vectors", "dim", "search_params", "recall_at_k", "k", "user_top_k")
    class SearchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    N_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECALL_AT_K_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USER_TOP_K_FIELD_NUMBER: _ClassVar[int]
    name: str
    factory: str
    metric: str
    n_vectors: int
    dim: int
    search_params: _containers.ScalarMap[str, int]
    recall_at_k: float
    k: int
    user_top_k: int
    def __init__(self, name: _Optional[str] = ..., factory: _Optional[str] = ..., metric: _Optional[str] = ..., n_vectors: _Optional[int] = ..., dim: _Optional[int] = ..., search_params: _Optional[_Mapping[str, int]] = ..., recall_at_k: _Optional[float] = ..., k: _Optional[int] = ..., user_top_k: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "created_at", "n_items", "n_users", "dataset", "data_fingerprint", "indexes", "sources", "max_k", "max_candidates", "max_batch", "loaded_seconds_ago", "reloads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    N_USERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOADED_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: str
    n_items: int
    n_users: int
    dataset: str
    data_fingerprint: str
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    sources: _containers.RepeatedScalarFieldContainer[str]
    max_k: int
    max_candidates: int
    max_batch: int
    loaded_seconds_ago: float
    reloads: int
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[str] = ..., n_items: _Optional[int] = ..., n_users: _Optional[int] = ..., dataset: _Optional[str] = ..., data_fingerprint: _Optional[str] = ..., indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., sources: _Optional[_Iterable[str]] = ..., max_k: _Optional[int] = ..., max_candidates: _Optional[int] = ..., max_batch: _Optional[int] = ..., loaded_seconds_ago: _Optional[float] = ..., reloads: _Optional[int] = ...) -> None: ...
