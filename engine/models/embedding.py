"""The one interface of a model that embeds users and items: what a retrieval source
searches ("ANN over model M") and what the ranking combines.

A model scores a (user, item) pair as an inner product of two vectors it exposes:
``score(u, i) = retrieval_user_vectors(u) . retrieval_item_vectors()[i] + user_bias(u)``
— the bias does not change one user's order, so an inner-product index over the item
vectors, queried with the user vectors, ranks as the model does. Collaborative
filtering (:class:`~engine.models.cf.CFModel`: ``[x, offset]`` against ``[w, 1]``) and
the two towers (:class:`~engine.models.towers.TwoTowerModel`) implement it; a model that
can embed a user or an item from raw features (cold start) says so with
``embeds_from_features``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from engine.data import IdMap


@runtime_checkable
class EmbeddingModel(Protocol):
    """A model of users and items as vectors (see the module)."""

    name: str  # the retrieval source and index it feeds: "cf" (cf_ip), "towers" (towers_ip)
    users: IdMap
    items: IdMap
    embeds_from_features: bool  # whether cold_user_vectors / cold_item_vectors work

    def retrieval_item_vectors(self) -> np.ndarray:
        """``[n_items, d]`` float32: the vectors of the model's inner-product index."""
        ...

    def retrieval_user_vectors(self, user_indices: np.ndarray) -> np.ndarray:
        """``[n, d]`` float32: known users' queries against :meth:`retrieval_item_vectors`."""
        ...

    def user_biases(self, user_indices: np.ndarray) -> np.ndarray:
        """``[n]`` float32: what the model adds to a user's inner products (0 for none)."""
        ...

    def cold_user_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        """``[n, d]`` queries for new users described by raw features (raises
        ``NotImplementedError`` where ``embeds_from_features`` is False)."""
        ...

    def cold_item_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        """``[n, d]`` index vectors for new items described by raw features (the same)."""
        ...
