"""Features of (user, candidate) pairs: what the learned ranker (:mod:`engine.models.ranker`)
orders a user's candidates by. Computed batch-first, for any number of users at once,
from what the bundle holds; a value that does not exist for a pair is NaN (a model that
does not know the user, an item added live, a user with no segment), which the ranker
treats as missing.

====================== ============ =====================================================
feature                group        meaning
====================== ============ =====================================================
cf_score               scores       the CF prediction, standardised as the blend does
towers_score           scores       the two-tower score, standardised
blend_score            scores       the blend of :mod:`engine.serving.ranking`
from_<source>          sources      1 when that source proposed the item (cf, towers,
                                    popular, segment, recent), else 0
n_sources              sources      how many sources proposed it
candidate_position     sources      its position among the merged candidates (order of
                                    first proposal: source order, then each source's rank)
item_popularity        popularity   log(1 + the item's interactions)
segment_popularity     popularity   log(1 + its interactions by users of the user's
                                    segment), 0 beyond the segment's top items
item_trend             popularity   log(1 + its interactions in the latest tenth of the
                                    training period)
item_age               popularity   the share of the training period since its first
                                    interaction (0: new)
user_activity          user         log(1 + the user's interactions)
user_like_rate         user         the user's share of likes among their interactions,
                                    shrunk toward the global share (explicit feedback)
item_like_rate         ratings      the item's share of likes among its interactions, shrunk
item_mean_rating       ratings      its mean rating, shrunk toward the global mean
rating_prediction      ratings      the user's rating of the item as predicted by the
                                    ranker's rating model (explicit data: CF with history
                                    factors, ``Ranker.rating``); missing for a user it
                                    does not know
recent_similarity_max  similarity   the largest cosine between the item's CF vector and
                                    those of the user's recent likes
recent_similarity_mean similarity   their mean
cooccurrence_sum       cooccurrence the item's co-occurrence similarity to the user's history:
                                    the sum of the cosines (of users) of its 100 most
                                    similar items that lie in the user's history
cooccurrence_mean      cooccurrence that sum over the history's length
ease_score             cooccurrence the item's EASE score for the user, ``sum_j x_uj B[j, i]``
                                    over the 100 largest weights into it (catalogues of at
                                    most 4,000 items; missing beyond)
affinity:<attribute>   affinity     for each multi-valued (e.g. genres) or categorical item
                                    attribute: the share of the user's history that has
                                    the item's value(s) (averaged over the item's labels)
====================== ============ =====================================================

A user no model knows and without history (cold start) still gets every item-side
feature; the ranker was trained with such gaps.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.data.attributes import CATEGORICAL, LABELS, ItemAttributes
from engine.serving import feature_kernels
from engine.serving.ranking import ScoreScale, dots
from engine.serving.retrieval import Candidates, Requests, positions_in_rows

if TYPE_CHECKING:
    from engine.models.cf import CFModel

SOURCES = ("cf", "towers", "popular", "segment", "recent")
RATE_PRIOR = 10.0  # pseudo-interactions at the global value that each like rate and mean rating start from


class _ThreadMarks(threading.local):
    """Per thread, the ``[n_items + 1]`` bool scratch in which the history kernels
    (:func:`~engine.serving.feature_kernels.weights_from_history`) mark a user's items,
    and which they leave all False: allocated once per catalogue size rather than zeroed
    on every request (100 kB on a 100k-item catalogue, whose writing also evicted the
    request's other data from the processor's cache)."""

    def __init__(self):
        self.marks = np.zeros(0, np.bool_)

    def sized(self, n: int) -> np.ndarray:
        if len(self.marks) != n:
            self.marks = np.zeros(n, np.bool_)
        return self.marks


_MARKS = _ThreadMarks()


def shrunk_mean(total, count, toward):
    """``(total + RATE_PRIOR toward) / (count + RATE_PRIOR)``: a mean of ``count`` values
    summing to ``total``, shrunk toward ``toward`` (so one 5-star rating is not a mean of
    5). The bundle's rate tables and a fold-in user's like rate both use it."""
    return (total + RATE_PRIOR * toward) / (count + RATE_PRIOR)


# Item-side features an item added live takes from its content neighbours (RankingFeatures._borrow).
BORROWED = (
    "rating_prediction",
    "item_popularity",
    "segment_popularity",
    "item_trend",
    "item_age",
    "item_like_rate",
    "item_mean_rating",
    "recent_similarity_max",
    "recent_similarity_mean",
    "cooccurrence_sum",
    "cooccurrence_mean",
    "ease_score",
)

MAX_AFFINITY_VALUES = 512  # categorical attributes with more values get no affinity feature


def base_feature_groups(models: tuple[str, ...] = ("cf", "towers"), rating: bool = False) -> dict[str, str]:
    """Feature name -> group, in column order, of every feature but the affinities
    (``rating``: with the rating model's prediction)."""
    groups = {f"{name}_score": "scores" for name in models}
    groups["blend_score"] = "scores"
    groups.update({f"from_{name}": "sources" for name in SOURCES})
    groups.update({"n_sources": "sources", "candidate_position": "sources"})
    groups.update({name: "popularity" for name in ("item_popularity", "segment_popularity", "item_trend", "item_age")})
    groups.update({"user_activity": "user", "user_like_rate": "user"})
    groups.update({"item_like_rate": "ratings", "item_mean_rating": "ratings"})
    if rating:
        groups["rating_prediction"] = "ratings"
    groups.update({"recent_similarity_max": "similarity", "recent_similarity_mean": "similarity"})
    groups.update(
        {"cooccurrence_sum": "cooccurrence", "cooccurrence_mean": "cooccurrence", "ease_score": "cooccurrence"}
    )
    return groups


def affinity_attributes(attributes: ItemAttributes) -> list[str]:
    """The item attributes that get an affinity feature (see the module)."""
    return [
        name
        for name, a in attributes.attributes.items()
        if a.kind == LABELS or (a.kind == CATEGORICAL and 0 < len(a.vocabulary) <= MAX_AFFINITY_VALUES)
    ]


def feature_groups(models: tuple[str, ...], attributes: ItemAttributes, rating: bool = False) -> dict[str, str]:
    """Feature name -> group, in column order, of a bundle whose embedding models are
    ``models`` (in ranking order) and whose items have ``attributes`` (``rating``: whose
    ranker has a rating model)."""
    return _groups(models, affinity_attributes(attributes), rating)


def _groups(models: tuple[str, ...], affinity: list[str], rating: bool) -> dict[str, str]:
    """:func:`feature_groups` given the attributes with an affinity feature."""
    return {**base_feature_groups(models, rating), **{f"affinity:{a}": "affinity" for a in affinity}}


@dataclass
class ItemHistoryTables:
    """Per-item tables of the training period the bundle was built from
    (``index_builder.build.item_history_tables``); items added live lie beyond them."""

    like_rate: np.ndarray  # [n] float32 share of likes among the item's interactions, shrunk
    mean_rating: np.ndarray  # [n] float32 mean rating, shrunk
    trend: np.ndarray  # [n] float32 log(1 + interactions in the latest tenth of the period)
    age: np.ndarray  # [n] float32 share of the period since the first interaction
    cooccurring: np.ndarray  # [n, K] int32 most similar items by co-occurrence, -1 pads
    cooccurrence: np.ndarray  # [n, K] float32 their similarities
    ease_from: np.ndarray  # [n, K] int32 the items of largest EASE weight into each item, -1 pads
    ease_weight: np.ndarray  # [n, K] float32 those weights


class RankingFeatures:
    """Computes the feature matrix of (user, candidate) pairs (see the module)."""

    def __init__(
        self,
        models: tuple[str, ...],
        scales: Mapping[str, ScoreScale],
        history_tables: ItemHistoryTables,
        cf_item_vectors: np.ndarray,
        segment_key: str | None,
        segment_top_items: np.ndarray | None,
        segment_top_counts: np.ndarray | None,
        affinity: list[str],
    ):
        self.models, self.scales, self.tables = models, dict(scales), history_tables
        norms = np.linalg.norm(cf_item_vectors, axis=1, keepdims=True)
        self.unit_cf = (cf_item_vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        self.segment_key = segment_key
        # Segment popularity as sorted (segment, item) keys: a binary search per pair,
        # memory that of the segments' top lists, whatever the catalogue.
        self._segment_keys = self._segment_counts = None
        if segment_key is not None and segment_top_items is not None and segment_top_counts is not None:
            n_cols = np.int64(2**31)
            keys = np.arange(len(segment_top_items), dtype=np.int64)[:, None] * n_cols + segment_top_items
            order = np.argsort(keys, axis=None)
            self._segment_keys = keys.ravel()[order]
            self._segment_counts = np.log1p(segment_top_counts.ravel()[order]).astype(np.float32)
        # The per-item columns, stacked (one gather per request), and the values of items
        # beyond them (added live): trend and age 0 (new), the rates unknown.
        tables = history_tables
        self._trend_age = np.stack([tables.trend, tables.age], axis=1).astype(np.float32)
        self._rates = (
            np.stack([tables.like_rate, tables.mean_rating], axis=1).astype(np.float32)
            if len(tables.like_rate)
            else np.zeros((0, 2), np.float32)
        )
        self.affinity = list(affinity)
        self._set_rating(None)

    def with_rating(self, rating: CFModel | None) -> RankingFeatures:
        """These features with the prediction of ``rating`` (a ranker's rating model,
        ``Ranker.rating``; None: without that column)."""
        if rating is self.rating:
            return self
        out = copy.copy(self)
        out._set_rating(rating)
        return out

    def _set_rating(self, rating: CFModel | None) -> None:
        self.rating = rating
        # (CFModel.item_offsets adds three arrays of the catalogue's size: once, not per request.)
        self._rating_offsets = None if rating is None else rating.item_offsets
        self.groups = _groups(self.models, self.affinity, rating is not None)
        self.names = list(self.groups)  # the columns of compute(), in order
        self._column = {name: j for j, name in enumerate(self.names)}
        # Where feature_kernels.pair_columns' columns go, in its order.
        kernel_columns = [f"from_{source}" for source in SOURCES] + [
            "n_sources",
            "candidate_position",
            "item_popularity",
            "item_trend",
            "item_age",
            "user_activity",
            "item_like_rate",
            "item_mean_rating",
        ]
        self._pair_columns = np.array([self._column[name] for name in kernel_columns])

    def of_candidates(
        self,
        requests: Requests,
        candidates: Candidates,
        at: np.ndarray,
        blend_scores: np.ndarray,
        cat,
        model_scores: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The features of the candidates at positions ``at`` (rows ascending) of
        ``candidates``, whose blend scores are ``blend_scores``; ``cat`` the catalogue
        (:class:`~engine.serving.catalogue.Catalogue`) they were retrieved from;
        ``model_scores`` each model's standardised scores of them, where the blend
        computed them already."""
        return self.compute(
            requests,
            candidates.rows[at],
            candidates.items[at],
            candidates.source_bits[at],
            candidates.names,
            positions_in_rows(candidates.rows)[at],
            blend_scores,
            cat,
            model_scores,
        )

    def compute(
        self,
        requests: Requests,
        rows: np.ndarray,
        items: np.ndarray,
        source_bits: np.ndarray,
        source_names: tuple[str, ...],
        positions: np.ndarray,
        blend_scores: np.ndarray,
        cat,
        model_scores: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``[n, n_features]`` float32: the features of pairs (user ``rows[j]``, item
        ``items[j]``), ``rows`` ascending, given which sources proposed each item (bit
        ``b`` of ``source_bits``: ``source_names[b]``), its position among the merged
        candidates, its blend score and (where known) each model's standardised score."""
        out = np.full((len(rows), len(self.names)), np.nan, np.float32)
        at = self._column
        for name in self.models:  # each model's score, standardised
            if model_scores is not None and name in model_scores:
                out[:, at[f"{name}_score"]] = model_scores[name]
            else:
                out[:, at[f"{name}_score"]] = self._model_score(requests, name, rows, items, cat.item_vectors[name])
        out[:, at["blend_score"]] = blend_scores
        indptr, history = requests.history()
        lengths = np.diff(indptr)
        # The columns read off arrays, one compiled pass (feature_kernels.pair_columns).
        out[:, self._pair_columns] = feature_kernels.pair_columns(
            rows,
            items,
            positions,
            source_bits,
            _source_shifts(source_names),  # each source's bit, -1 where the request has none
            cat.popularity,
            self._trend_age,
            self._rates,
            lengths,
        )
        out[:, at["segment_popularity"]] = self._segment_popularity(requests, rows, items)
        out[:, at["user_like_rate"]] = np.nan if requests.like_rate is None else requests.like_rate[rows]
        if self.rating is not None:
            out[:, at["rating_prediction"]] = self._rating_prediction(requests, rows, items)
        largest, mean = self._recent_similarity(requests, rows, items)
        out[:, at["recent_similarity_max"]], out[:, at["recent_similarity_mean"]] = largest, mean
        tables = self.tables
        marked = _MARKS.sized(len(cat.popularity) + 1)  # the history's items, for both tables
        total = feature_kernels.weights_from_history(
            tables.cooccurring, tables.cooccurrence, indptr, history, rows, items, marked
        )
        out[:, at["cooccurrence_sum"]] = total
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, at["cooccurrence_mean"]] = total / lengths[rows]
        out[:, at["ease_score"]] = feature_kernels.weights_from_history(
            tables.ease_from, tables.ease_weight, indptr, history, rows, items, marked
        )
        for name in self.affinity:
            out[:, at[f"affinity:{name}"]] = _affinity(cat.attributes[name], indptr, history, rows, items)
        live = items >= cat.n_bundle
        if live.any():
            self._borrow(out, live, requests, rows, items, cat)
        return out

    def _borrow(self, out: np.ndarray, live: np.ndarray, requests: Requests, rows, items, cat) -> None:
        """Items added live have no interactions: their item-side features (BORROWED) are
        the weighted mean of their content neighbours' for the same user
        (``Catalogue.borrowed_from``, :mod:`engine.serving.live_items`), NaNs left out."""
        at = items[live] - cat.n_bundle
        near, weights = cat.borrowed_from[at], cat.borrowed_weights[at]  # [m, K]
        m, k = near.shape
        pairs_rows = np.repeat(rows[live], k)
        zeros = np.zeros(m * k)
        theirs = self.compute(
            requests, pairs_rows, near.ravel(), zeros.astype(np.uint32), (), zeros, zeros.astype(np.float32), cat
        )
        columns = np.array([self._column[name] for name in BORROWED if name in self._column])
        values = theirs[:, columns].reshape(m, k, len(columns)).astype(np.float64)
        w = np.where(np.isnan(values), 0.0, weights[:, :, None])
        with np.errstate(invalid="ignore"):
            mean = np.nansum(values * w, axis=1) / w.sum(axis=1)
        out[np.ix_(np.flatnonzero(live), columns)] = mean.astype(np.float32)

    def _model_score(
        self, requests: Requests, name: str, rows: np.ndarray, items: np.ndarray, matrix: np.ndarray
    ) -> np.ndarray:
        user, scale = requests.models[name], self.scales[name]
        inside = items < len(matrix)
        raw = dots(matrix, np.where(inside, items, 0), user.vectors, rows) + user.bias[rows]
        return np.where(inside & user.has[rows], scale(raw), np.nan).astype(np.float32)

    def _rating_prediction(self, requests: Requests, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The rating model's predicted rating of each pair, clipped to its rating range;
        NaN for a user it does not know or an item beyond its table (added live:
        borrowed from the item's content neighbours, like the other item evidence)."""
        rating = self.rating
        assert rating is not None and self._rating_offsets is not None
        users = np.full(len(requests), -1, np.int64) if requests.users is None else requests.users
        return feature_kernels.predicted_ratings(
            rating.X, rating.W, rating.user_bias, self._rating_offsets, users, rows, items, *rating.rating_range
        )

    def _segment_popularity(self, requests: Requests, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        if self._segment_keys is None or self._segment_counts is None or self.segment_key not in requests.segments:
            return np.full(len(rows), np.nan, np.float32)
        segments = requests.segments[self.segment_key][rows]
        return feature_kernels.segment_counts(self._segment_keys, self._segment_counts, segments, items)

    def _recent_similarity(self, requests: Requests, rows: np.ndarray, items: np.ndarray) -> tuple:
        """Max and mean cosine of each item's CF vector to its user's recent likes'."""
        return feature_kernels.recent_similarity(self.unit_cf, requests.recent_liked, rows, items)


@functools.lru_cache(maxsize=64)
def _source_shifts(names: tuple[str, ...]) -> np.ndarray:
    """Per source of :data:`SOURCES`, its bit in a request's candidate sources (``names``), -1 if absent."""
    return np.array([names.index(name) if name in names else -1 for name in SOURCES], np.int64)


def _affinity(attribute, indptr: np.ndarray, history: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The share of each user's history sharing the item's value(s) of ``attribute``
    (labels: averaged over the item's labels); NaN for a user with no history."""
    if attribute.kind == LABELS:
        return feature_kernels.label_affinity(attribute.values, indptr, history, rows, items)
    # categorical codes, -1 missing
    return feature_kernels.code_affinity(attribute.values, len(attribute.vocabulary), indptr, history, rows, items)
