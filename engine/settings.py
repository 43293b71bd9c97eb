"""The settings of each stage, with their defaults, in one place.

Each class is one section of ``tandem.toml`` (:mod:`engine.config` builds its defaults
from these classes, so a default is written once): :class:`IndexConfig` is ``[index]``
(the index builder), :class:`EngineConfig` is ``[engine]`` (serving), and
:class:`ServerConfig` is ``[server]`` (the gRPC service). The models' settings live
with the models (``engine.models.cf.CFConfig``, ``engine.models.towers.TowerConfig``).
Only plain Python here: the command line reads these without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

BACKENDS = ("faiss", "milvus")  # where the index builder puts the vectors (engine.index)
PIPELINES = ("compiled", "batch")  # engine.serving.pipeline
HOLDOUTS = ("auto", "temporal", "random")  # what the learned ranker learns to predict
RANKINGS = ("auto", "blend")  # engine.serving.engine: the learned ranker when present, or the blend
DEFAULT_SOURCE_WEIGHTS = {"cf": 0.35, "towers": 0.35, "popular": 0.1, "segment": 0.1, "recent": 0.1}


def from_known_settings(cls, values: dict, what: str):
    """``cls(**values)``, refusing names that are not fields of the settings class ``cls``
    with a message that lists the known ones (``what``: "CF", "tower", "ranker")."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


@dataclass
class IndexConfig:
    """Index building (the ``[index]`` section)."""

    factory: str = ""  # FAISS factory string for every index; "" chooses by catalogue size
    exact_below: int = 50_000  # items: exact (Flat) search below, HNSW32 above
    recall_floor: float = 0.95  # publishing is refused below this recall@k
    recall_k: int = 10
    keep: int = 5  # bundle versions kept
    user_top_k: int = 256  # items per user precomputed for the CF and two-tower sources (0: none)
    # Where the vectors are searched: "faiss" (files in the bundle, in process) or "milvus"
    # (collections in Milvus: engine.index.milvus_index; the `milvus` extra).
    backend: str = "faiss"
    milvus_uri: str = "artifacts/milvus.db"  # a local file (Milvus Lite) or http://host:19530
    milvus_db: str = ""  # the Milvus database ("": the default one); the token: $TANDEM_MILVUS_TOKEN

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"index.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class RankerConfig:
    """The learned ranker (the ``[ranker]`` section, :mod:`engine.models.ranker`): whether
    ``make train`` trains one, on what, and how."""

    enabled: bool = True  # train one with make train / train_and_publish (else serve the blend)
    # What the ranker learns to predict: "temporal", each user's latest interactions (what
    # a deployment meets: the future), "random", a random share of each user's (what a
    # random test split asks), or "auto": temporal when the data has timestamps.
    holdout: str = "auto"
    holdout_fraction: float = 0.2  # the share of each user's interactions held out
    holdout_rounds: int = 2  # random holdouts (seeds seed, seed + 1, ...) pooled: more examples, more time
    n_candidates: int = 500  # candidates per user the examples are drawn from (as served)
    depth: int = 50  # candidates per user the ranker re-scores: the blend's best
    max_users: int = 5000  # users sampled for the examples (memory and time bound)
    num_trees: int = 150
    # Stop adding trees when a fifth of the users' NDCG@10 stops improving. Off by default:
    # on a few hundred users that curve is noise, and stopping on it cost more than it saved.
    early_stopping: bool = False
    num_leaves: int = 7
    learning_rate: float = 0.05
    min_data_in_leaf: int = 200
    feature_fraction: float = 0.8
    lambda_l2: float = 1.0
    # Explicit data: train a rating model (CF with history factors, engine.models.cf) with
    # the ranker's models, whose predicted rating is the rating_prediction feature.
    rating_model: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"ranker.holdout must be one of {HOLDOUTS}, got {self.holdout!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"ranker.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in ("holdout_rounds", "n_candidates", "depth", "max_users", "num_trees", "min_data_in_leaf"):
            if getattr(self, name) < 1:
                raise ValueError(f"ranker.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_leaves < 2:
            raise ValueError(f"ranker.num_leaves must be >= 2, got {self.num_leaves}")
        if not 0.0 < self.learning_rate <= 1.0 or not 0.0 < self.feature_fraction <= 1.0:
            raise ValueError("ranker.learning_rate and ranker.feature_fraction must be in (0, 1]")

    @classmethod
    def from_dict(cls, values: dict) -> RankerConfig:
        return from_known_settings(cls, values, "ranker")


FSYNC_POLICIES = ("batch", "none")  # when the feedback log reaches the disk


@dataclass
class FeedbackConfig:
    """Live feedback (the ``[engine.feedback]`` section, :mod:`engine.data.feedback`):
    the kinds of events ``Engine.record`` / ``RecordFeedback`` accept and how each counts."""

    kinds: list = field(default_factory=lambda: ["view", "click", "purchase", "rating"])  # accepted
    # Kinds whose events must carry a value: a rating on the data's scale.
    rating_kinds: list = field(default_factory=lambda: ["rating"])
    # Kinds that are likes whatever their value (a like feeds the "recent" source); other
    # events are likes by the data's rule (engine.data.dataset.liked_mask).
    like_kinds: list = field(default_factory=lambda: ["click", "purchase"])
    # The value of a (user, item) pair whose events carry none, on explicit data (on
    # implicit data every pair has the data's one value).
    default_value: float = 1.0
    # "batch": each batch is fsynced before it is acknowledged (an OS crash loses
    # nothing acknowledged); "none": written before the reply, flushed when the OS decides.
    fsync: str = "batch"
    sync_interval: float = 0.2  # seconds between reads of the other processes' events

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"engine.feedback.fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        if not self.kinds or not all(isinstance(k, str) and k for k in self.kinds):
            raise ValueError("engine.feedback.kinds must be a list of non-empty names")
        for name in ("rating_kinds", "like_kinds"):
            unknown = [k for k in getattr(self, name) if k not in self.kinds]
            if unknown:
                raise ValueError(f"engine.feedback.{name} names kinds not in engine.feedback.kinds: {unknown}")
        if len(self.kinds) > 127:  # a kind is stored as one int8 per event
            raise ValueError("engine.feedback.kinds: at most 127 kinds")
        if self.sync_interval < 0:
            raise ValueError("engine.feedback.sync_interval must be >= 0")


@dataclass
class EngineConfig:
    """Serving settings (the ``[engine]`` section)."""

    # Share of n_candidates each retrieval source may fill.
    source_weights: dict = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
    blend_towers: float = 0.5  # ranking: weight of the standardised two-tower score
    blend_cf: float = 0.5  # ranking: weight of the standardised CF prediction (known users)
    blend_popularity: float = 0.25  # ranking: weight of the items' standardised log-popularity
    # Ranking: "auto" serves the bundle's learned ranker when it has one (it re-scores
    # the blend's best candidates), "blend" the blend alone (engine.serving.ranking).
    ranking: str = "auto"
    segment_key: str = "zip_region"  # segment popularity by: occupation, zip_region or age_band
    max_k: int = 1000
    max_candidates: int = 5000
    # Longest item id / title / text feature value a request may carry (characters).
    max_id_length: int = 256
    max_text_length: int = 1024
    # How candidates are merged (engine.serving.pipeline): "compiled" serves a lone
    # request with numba kernels, "batch" with array operations (the same results).
    pipeline: str = "compiled"
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)  # live feedback ([engine.feedback])

    def __post_init__(self) -> None:
        if isinstance(self.feedback, dict):  # from the configuration file
            self.feedback = from_known_settings(FeedbackConfig, self.feedback, "engine.feedback")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"engine.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"engine.ranking must be one of {RANKINGS}, got {self.ranking!r}")

    def check_texts(self, values, what: str, ids: bool = False) -> None:
        """Refuse a request's text values longer than ``max_text_length`` (``ids``:
        ``max_id_length``) characters: one long value must not multiply memory."""
        from engine.errors import InvalidRequest

        limit, key = (self.max_id_length, "max_id_length") if ids else (self.max_text_length, "max_text_length")
        for value in values:
            if isinstance(value, str) and len(value) > limit:
                raise InvalidRequest(f"{what} of {len(value):,} characters; at most {limit:,} (engine.{key})")


@dataclass
class ServerConfig:
    """Server settings (the ``[server]`` section; ``token`` and ``reuse_port`` come from
    flags and the environment, never from the file)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    processes: int = 1  # server processes sharing the port (tandem serve --processes)
    # Threads for the long rpcs (RecommendBatch, the writes, Reload; the others run on
    # the server's event loop). Engine work holds the GIL, so more threads add
    # contention, not throughput; two keep a long request from blocking the rest.
    # Cores: `processes`.
    workers: int = 2
    max_batch: int = 1000  # users per RecommendBatch / items per AddItems
    max_batch_results: int = 100_000  # users x k per RecommendBatch (keeps the reply within its size limit)
    max_message_bytes: int = 4 * 1024 * 1024
    token: str | None = None  # bearer token; None = no authentication
    token_all: bool = False  # require the token on every rpc, not only on Admin and AddItems
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off, 0 = any free port
    # The HTTP/JSON API and the web page (engine/service/http.py) on the same engine;
    # None = off, 0 = any free port.
    http_port: int | None = None
    # The `tandem eval-pipeline` report the web page plots, when the file exists.
    eval_report: str = "artifacts/eval/pipeline.json"
    watch_interval: float = 1.0  # seconds between checks of `current` and the add journal; 0 = none
    grace: float = 10.0  # seconds in-flight requests get on shutdown
    # Share the port with other processes (SO_REUSEPORT): only the processes of one
    # `tandem serve --processes N` group do; a lone server refuses a port in use.
    reuse_port: bool = False

    # Set by flags and the environment only.
    NOT_IN_FILE = ("token", "reuse_port")
