"""The settings of each stage, with their defaults, in one place.

Each class is one section of ``tandem.toml`` (:mod:`engine.config` builds its defaults
from these classes, so a default is written once): :class:`IndexConfig` is ``[index]``
(the index builder), :class:`EngineConfig` is ``[engine]`` (serving), and
:class:`ServerConfig` is ``[server]`` (the gRPC service). The models' settings live
with the models (``engine.models.cf.CFConfig``, ``engine.models.towers.TowerConfig``).
Only plain Python here: the command line reads these without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PIPELINES = ("compiled", "batch")  # engine.serving.pipeline
DEFAULT_SOURCE_WEIGHTS = {"cf": 0.35, "towers": 0.35, "popular": 0.1, "segment": 0.1, "recent": 0.1}


@dataclass
class IndexConfig:
    """Index building (the ``[index]`` section)."""

    factory: str = ""  # FAISS factory string for every index; "" chooses by catalogue size
    exact_below: int = 50_000  # items: exact (Flat) search below, HNSW32 above
    recall_floor: float = 0.95  # publishing is refused below this recall@k
    recall_k: int = 10
    keep: int = 5  # bundle versions kept
    user_top_k: int = 256  # items per user precomputed for the CF and two-tower sources (0: none)


@dataclass
class EngineConfig:
    """Serving settings (the ``[engine]`` section)."""

    # Share of n_candidates each retrieval source may fill.
    source_weights: dict = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
    blend_towers: float = 0.5  # ranking: weight of the standardised two-tower score
    blend_cf: float = 0.5  # ranking: weight of the standardised CF prediction (known users)
    blend_popularity: float = 0.25  # ranking: weight of the items' standardised log-popularity
    segment_key: str = "zip_region"  # segment popularity by: occupation, zip_region or age_band
    max_k: int = 1000
    max_candidates: int = 5000
    # Longest item id / title / text feature value a request may carry (characters).
    max_id_length: int = 256
    max_text_length: int = 1024
    # How candidates are merged (engine.serving.pipeline): "compiled" serves a lone
    # request with numba kernels, "batch" with array operations (the same results).
    pipeline: str = "compiled"

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"engine.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")

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
    # Request threads. Engine work holds the GIL, so more threads add contention, not
    # throughput; two keep a long request from blocking the rest. Cores: `processes`.
    workers: int = 2
    max_batch: int = 1000  # users per RecommendBatch / items per AddItems
    max_batch_results: int = 100_000  # users x k per RecommendBatch (keeps the reply within its size limit)
    max_message_bytes: int = 4 * 1024 * 1024
    token: str | None = None  # bearer token; None = no authentication
    token_all: bool = False  # require the token on every rpc, not only on Admin and AddItems
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off, 0 = any free port
    watch_interval: float = 1.0  # seconds between checks of `current` and the add journal; 0 = none
    grace: float = 10.0  # seconds in-flight requests get on shutdown
    # Share the port with other processes (SO_REUSEPORT): only the processes of one
    # `tandem serve --processes N` group do; a lone server refuses a port in use.
    reuse_port: bool = False

    # Set by flags and the environment only.
    NOT_IN_FILE = ("token", "reuse_port")
