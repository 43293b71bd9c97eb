"""Exact ranking: a weighted blend of N embedding models' scores, each standardised
with statistics fixed per bundle (top-k selection is :mod:`engine.topk`).

Model ``m`` scores (user ``u``, item ``i``) as ``s_m = q_m(u) . v_m(i) + b_m(u)`` (its
:class:`~engine.serving.retrieval.UserQueries` against its retrieval item vectors, see
:class:`~engine.models.embedding.EmbeddingModel`). The blend is

    score(u, i) = (sum_m w_m z_m(u, i) + w_p z_p(i)) / (sum_m w_m + w_p),   z_m = (s_m - mean_m) / std_m,

over the models that know the user (``has``), ``z_p`` the item's standardised
log-popularity with weight ``w_p`` (``engine.blend_popularity``, 0 by default); an item a model has no vector for
is scored by the models that have one, the sum over them divided by their weight, so
that an item is ranked on the evidence it has rather than on a missing model's mean
(items added live get every model's vector: :mod:`engine.serving.live_items`). A user no
model knows is ranked by standardised popularity.

Standardising with bundle-wide statistics (not per request) keeps a pair's score the
same whatever else is being ranked, so ``score`` of a few items, ``recommend`` and
``recommend_batch`` agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numba import njit

from engine.serving.retrieval import Requests


@dataclass
class ScoreScale:
    """Mean and standard deviation of one score over (user, item) pairs of the bundle."""

    mean: float
    std: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (scores - self.mean) / self.std

    @classmethod
    def fit(cls, samples: np.ndarray) -> ScoreScale:
        samples = np.asarray(samples, np.float64).ravel()
        std = float(samples.std()) if samples.size > 1 else 1.0
        return cls(float(samples.mean()) if samples.size else 0.0, std if std > 1e-9 else 1.0)


class Blend:
    """The ranking of N models: ``weights`` and ``scales`` by model name (see the module).

    Scoring folds each model's weight, scale and user bias into a per-user factor and
    constant, ``w_m / (W std_m) * (q_m . v_m) + w_m / (W std_m) * (b_m - mean_m)`` with
    ``W`` the user's total weight, so that ranking costs one dot product per model and
    candidate. A lone request computes the same float32 operations with scalars."""

    def __init__(self, weights: Mapping[str, float], scales: Mapping[str, ScoreScale], popularity: float = 0.0):
        """``popularity``: the weight of the items' standardised log-popularity, one more
        term of every user's blend (evidence that sparse data often needs most)."""
        if popularity < 0:
            raise ValueError(f"the popularity weight must be >= 0, got {popularity}")
        if set(weights) != set(scales):
            raise ValueError(f"blend weights {sorted(weights)} and score scales {sorted(scales)} name other models")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) == 0:
            raise ValueError(f"blend weights must be >= 0 and not all 0, got {dict(weights)}")
        self.weights, self.scales, self.popularity = dict(weights), dict(scales), float(popularity)
        self.names = [name for name, w in self.weights.items() if w > 0]

    def scores(
        self,
        requests: Requests,
        rows: np.ndarray,
        items: np.ndarray,
        item_vectors: Mapping[str, np.ndarray],
        popularity_score: np.ndarray,
        standardised: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Exact scores of (user ``rows[j]``, item ``items[j]``) pairs (``rows``
        ascending); ``item_vectors`` are each model's retrieval item vectors. Given a
        dict ``standardised``, each model's standardised score ``z_m`` of every pair is
        put there too (NaN where the model knows neither the user nor the item): the
        ranker's features, read off the blend's own terms rather than computed twice."""
        if len(requests) == 1:
            return self._scores_alone(requests, items, item_vectors, popularity_score, standardised)
        n_items = len(popularity_score)
        f32 = np.float32
        has = {name: requests.models[name].has for name in self.names}
        total, none = self.user_weights(requests)
        scores = np.zeros(len(items), np.float32)
        missing = None  # per pair: the weight of the user's models that lack the item
        for name in self.names:
            user = requests.models[name]
            scale = self.scales[name]
            factor = np.where(has[name], self.weights[name], 0.0) / (total * scale.std)
            const = factor * (user.bias.astype(np.float64) - scale.mean)
            query = user.vectors * factor.astype(f32)[:, None]
            part, beyond = self._model_part(item_vectors[name], items, query, rows, const.astype(f32)[rows], n_items)
            scores += part
            if standardised is not None:  # z = part W / w (float32 as the lone path computes it)
                z = part * (total / self.weights[name]).astype(f32)[rows]
                known = has[name][rows] if beyond is None else has[name][rows] & ~beyond
                standardised[name] = np.where(known, z, np.float32(np.nan))
            if beyond is not None:
                lacking = np.where(beyond & has[name][rows], self.weights[name], 0.0)
                missing = lacking if missing is None else missing + lacking
        if self.popularity:
            scores += (self.popularity / total).astype(f32)[rows] * popularity_score[items]
        if missing is not None:
            scores = self._renormalised(scores, total[rows], missing, popularity_score[items])
        return np.where(none[rows], popularity_score[items], scores) if none.any() else scores

    def user_weights(self, requests: Requests) -> tuple[np.ndarray, np.ndarray]:
        """``(total [U], none [U])``: each user's total blend weight ``W`` (the models
        that know them, plus popularity's) and whether no model knows them (then
        ``W = 1 + w_p``; their score is popularity alone)."""
        total = np.zeros(len(requests))
        for name in self.names:
            total += np.where(requests.models[name].has, self.weights[name], 0.0)
        none = total == 0
        return np.where(none, 1.0, total) + self.popularity, none

    def terms(
        self, requests: Requests, rows: np.ndarray, standardised: Mapping[str, np.ndarray], popularity: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each term of the blend of pairs (user ``rows[j]``, item ``j``), by model name
        and ``"popularity"``: ``w_m z_m / W`` (0 where the model has no score) and
        ``w_p z_p / W``, or ``z_p`` alone for a user no model knows. They add up to the
        score, except for an item some model lacks (added live), which the score
        renormalises over the models that have it."""
        total, none = self.user_weights(requests)
        terms = {name: np.nan_to_num(standardised[name]) * self.weights[name] / total[rows] for name in self.names}
        terms["popularity"] = np.where(none[rows], 1.0, self.popularity / total[rows]) * popularity
        return terms

    def _scores_alone(
        self,
        requests: Requests,
        items: np.ndarray,
        item_vectors: Mapping[str, np.ndarray],
        popularity_score: np.ndarray,
        standardised: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        known = [name for name in self.names if requests.models[name].has[0]]
        if standardised is not None:  # the models that do not know the user: no score
            for name in self.names:
                if name not in known:
                    standardised[name] = np.full(len(items), np.nan, np.float32)
        if not known:
            return popularity_score[items]
        total = sum(self.weights[name] for name in known) + self.popularity
        rows, n_items = _ROW_ZERO, len(popularity_score)
        scores = np.zeros(len(items), np.float32)  # summed as the batch path sums
        missing = None
        for name in known:
            user, scale = requests.models[name], self.scales[name]
            factor = self.weights[name] / (total * scale.std)
            const = np.float32(factor * (float(user.bias[0]) - scale.mean))
            part, beyond = self._model_part(
                item_vectors[name], items, user.vectors * np.float32(factor), rows, const, n_items
            )
            scores += part
            if standardised is not None:  # z = part W / w
                z = part * np.float32(total / self.weights[name])
                standardised[name] = z if beyond is None else np.where(beyond, np.float32(np.nan), z)
            if beyond is not None:
                lacking = np.where(beyond, self.weights[name], 0.0)
                missing = lacking if missing is None else missing + lacking
        if self.popularity:
            scores += np.float32(self.popularity / total) * popularity_score[items]
        if missing is not None:
            scores = self._renormalised(scores, np.full(len(items), float(total)), missing, popularity_score[items])
        return scores

    @staticmethod
    def _renormalised(scores, total, missing, popularity) -> np.ndarray:
        """Scores of items some of the user's models have no vector for (added live) as
        the blend of the models that have one: the weighted sum divided by their weight,
        not by every model's (which would count the missing ones' mean and sink a new
        item below every item the models know). Pairs no model scores: popularity."""
        present = total - missing
        ratio = (total / np.where(present > 0, present, 1.0)).astype(np.float32)
        return np.where(present > 0, scores * ratio, popularity).astype(np.float32)

    @staticmethod
    def _model_part(
        matrix: np.ndarray, items: np.ndarray, queries: np.ndarray, rows: np.ndarray, const, n_items: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``matrix[items[j]] . queries[rows[j]] + const[j]``, and which items lie beyond
        the model's vectors (added live; their part is 0), None when none can."""
        if len(matrix) >= n_items:  # the model has a vector for every item of the catalogue
            return dots(matrix, items, queries, rows) + const, None
        beyond = items >= len(matrix)
        part = dots(matrix, np.where(beyond, 0, items), queries, rows) + const
        return np.where(beyond, np.float32(0), part), beyond


_ROW_ZERO = np.zeros(0, np.int64)


def dots(matrix: np.ndarray, items: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[items[j]] . vectors[rows[j]]`` for every ``j`` (``rows`` ascending), in one
    compiled pass (no gathered copy of the rows), summed in the same order for a user
    alone and in a batch, so that their scores are bitwise the same."""
    return _dots(matrix, items, vectors, rows)


@njit(cache=True, nogil=True)
def _dots(matrix, items, vectors, rows):  # pragma: no cover - compiled
    out = np.empty(len(items), np.float32)
    lone = vectors.shape[0] == 1
    for j in range(len(items)):
        out[j] = row_dot(matrix, items[j], vectors, 0 if lone else rows[j])
    return out


@njit(cache=True, nogil=True, inline="always")
def row_dot(matrix, row, vectors, at):  # pragma: no cover - compiled
    """``matrix[row] . vectors[at]`` in float32, summed in order: what every compiled
    score of a (user, item) pair sums (``dots``, ``feature_kernels.predicted_ratings``)."""
    total = np.float32(0.0)
    for d in range(matrix.shape[1]):
        total += matrix[row, d] * vectors[at, d]
    return total
