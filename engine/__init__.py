"""Tandem: a recommendation retrieval engine.

Learns item and user embeddings (collaborative filtering and a two-tower network),
indexes item vectors with FAISS, and serves recommendations in two stages.
This package is the embedded library; ``engine.data`` is the data layer and
``engine.metrics`` the evaluation metrics.
"""

__version__ = "0.1.0"
