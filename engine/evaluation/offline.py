"""Offline evaluation shared by every model: rating error and top-N quality (B1/B2).

Protocol B2: relevant items are a user's test items rated at least ``min_rating``;
each user's ranking excludes the items they interacted with in training; metrics are
averaged over users with at least one relevant item.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.data import Dataset
from engine.errors import TandemError
from engine.evaluation import metrics
from engine.topk import top_k_rows


class EvaluationError(TandemError, ValueError):
    """An evaluation that cannot be computed on the given data (no relevant test item)."""


def check_aligned(model_users, model_items, dataset: Dataset) -> None:
    """Refuse to evaluate a model on data indexed by different id maps."""
    if model_users != dataset.users or model_items != dataset.items:
        raise ValueError(
            "the model and the test data use different user/item id maps: "
            "evaluate on a split of the dataset the model was trained on"
        )


def rating_metrics(
    predict_indices: Callable[[np.ndarray, np.ndarray], np.ndarray],
    test: Dataset,
    clip: tuple[float, float] | None = None,
) -> dict[str, float]:
    """RMSE and MAE of ``predict_indices(user_idx, item_idx)`` on the test ratings
    (predictions clipped to ``clip`` when given, as protocol B1 asks)."""
    pred = predict_indices(test.user_idx, test.item_idx)
    if clip is not None:
        pred = np.clip(pred, *clip)
    return {"rmse": metrics.rmse(test.ratings, pred), "mae": metrics.mae(test.ratings, pred)}


def topn_metrics(
    recommend_indices: Callable[[np.ndarray, int], np.ndarray],
    test: Dataset,
    k: int = 10,
    min_rating: float | str | None = "auto",
) -> dict[str, float]:
    """Top-N metrics at ``k`` for the users with relevant test items (relevance:
    :func:`engine.evaluation.metrics.relevant_matrix`; by default the data's own rule).

    ``recommend_indices(user_indices, k)`` returns ``[n, k]`` item indices with the
    training items already excluded.
    """
    relevant = metrics.relevant_matrix(test, min_rating)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(users) == 0:
        rule = (
            "every interaction (implicit data)"
            if min_rating == "auto" and test.implicit
            else (f"rating >= {4.0 if min_rating == 'auto' else min_rating}")
        )
        raise EvaluationError(
            f"no user of {test.name} has a relevant test item ({rule}): nothing to evaluate; "
            "set another threshold (--min-rating) or split"
        )
    recs = recommend_indices(users, k)
    report = metrics.ranking_metrics(recs, relevant[users], k)
    report["n_users_evaluated"] = int(len(users))
    return report


def popularity_recommender(train: Dataset) -> Callable[[np.ndarray, int], np.ndarray]:
    """The popularity baseline of protocol B2: every user gets the most interacted-with
    items of ``train`` that they have not interacted with. Returns a
    ``recommend_indices(user_indices, k)`` function for :func:`topn_metrics`."""
    counts = train.item_counts().astype(np.float64)
    seen = train.user_items()

    def recommend(users: np.ndarray, k: int, block: int = 256) -> np.ndarray:
        return np.concatenate(
            [
                top_k_rows(np.tile(counts, (len(part), 1)), k, seen, part)
                for part in np.array_split(users, max(1, -(-len(users) // block)))
            ]
        )

    return recommend
