"""Tandem: a recommendation retrieval engine.

Learns item and user embeddings (collaborative filtering and a two-tower network),
indexes item vectors with FAISS, and serves recommendations in two stages.
This package is the embedded library: ``engine.Engine.load(bundle)`` serves a published
bundle; ``engine.data`` is the data layer, ``engine.models.cf`` and ``engine.models.towers`` the
models, ``engine.evaluation.metrics`` the evaluation metrics.
"""

__version__ = "0.1.0"

from engine.results import Recommendations  # noqa: E402  (the public surface)
from engine.serving.engine import Engine  # noqa: E402
from engine.settings import EngineConfig  # noqa: E402

__all__ = ["Engine", "EngineConfig", "Recommendations", "__version__"]
