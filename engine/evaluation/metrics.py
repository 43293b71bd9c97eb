"""Evaluation metrics as pure, vectorised functions.

Conventions for top-N metrics:

- ``recommended``: ``[n_users, >=k]`` int array of item indices, best first; ``-1``
  pads rows that have fewer than ``k`` items (a padded slot is never a hit).
- ``relevant``: scipy CSR ``[n_users, n_items]``; a stored non-zero marks a relevant
  item. Row ``u`` of both refers to the same user.
- Each metric returns the **mean over users with at least one relevant item** (users
  with none are left out, as in protocol B2), as a Python float.

Definitions (binary relevance, ``hits[u, r]`` = the item at rank ``r`` is relevant):

- Precision@k = hits / k
- Recall@k = hits / min(#relevant, k)
- NDCG@k = sum_r hits[r] / log2(r + 2)  divided by the ideal sum over min(#relevant, k) ranks
- MAP@k = sum_r Precision@(r+1) * hits[r]  /  min(#relevant, k)
- HitRate@k = 1 if any hit in the top k
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


# ------------------------------------------------------------ rating prediction
def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error."""
    y_true, y_pred = _paired(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error."""
    y_true, y_pred = _paired(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"y_true and y_pred differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size == 0:
        raise ValueError("no values to compare")
    return a, b


# ------------------------------------------------------------------- top-N
def hits_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> np.ndarray:
    """``[n_users, k]`` bool: whether each recommended item is relevant to its user."""
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be [n_users, k], got shape {rec.shape}")
    if not 1 <= k <= rec.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the {rec.shape[1]} recommended columns")
    relevant = sp.csr_matrix(relevant)
    if relevant.shape[0] != rec.shape[0]:
        raise ValueError(f"recommended has {rec.shape[0]} rows but relevant has {relevant.shape[0]}")
    rec = rec[:, :k].astype(np.int64)
    n_items = relevant.shape[1]
    rows, cols = relevant.nonzero()  # row-major order, so the keys come out sorted
    rel_keys = np.sort(rows.astype(np.int64) * n_items + cols)
    valid = (rec >= 0) & (rec < n_items)
    keys = np.arange(rec.shape[0], dtype=np.int64)[:, None] * n_items + np.where(valid, rec, 0)
    pos = np.minimum(np.searchsorted(rel_keys, keys), max(len(rel_keys) - 1, 0))
    found = rel_keys[pos] == keys if len(rel_keys) else np.zeros_like(keys, bool)
    return found & valid


def _n_relevant(relevant: sp.csr_matrix) -> np.ndarray:
    """Relevant items per user ``[n_users]`` (explicit zeros do not count)."""
    return np.diff(sp.csr_matrix(relevant != 0).indptr)


def _mean_over_relevant(per_user: np.ndarray, n_rel: np.ndarray) -> float:
    mask = n_rel > 0
    if not mask.any():
        raise ValueError("no user has a relevant item: the metric is undefined")
    return float(per_user[mask].mean())


def precision_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> float:
    """Mean Precision@k: hits in the top k divided by k."""
    hits = hits_at_k(recommended, relevant, k)
    return _mean_over_relevant(hits.sum(1) / k, _n_relevant(relevant))


def recall_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> float:
    """Mean Recall@k: hits in the top k divided by min(#relevant, k)."""
    hits = hits_at_k(recommended, relevant, k)
    n_rel = _n_relevant(relevant)
    return _mean_over_relevant(hits.sum(1) / np.maximum(np.minimum(n_rel, k), 1), n_rel)


def ndcg_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> float:
    """Mean NDCG@k with binary gains."""
    hits = hits_at_k(recommended, relevant, k)
    n_rel = _n_relevant(relevant)
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = hits @ discounts
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, k)]
    return _mean_over_relevant(dcg / np.maximum(ideal, 1e-12), n_rel)


def map_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> float:
    """Mean average precision at k, normalised by min(#relevant, k)."""
    hits = hits_at_k(recommended, relevant, k)
    n_rel = _n_relevant(relevant)
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    ap = (precision_at_rank * hits).sum(1) / np.maximum(np.minimum(n_rel, k), 1)
    return _mean_over_relevant(ap, n_rel)


def hit_rate_at_k(recommended: np.ndarray, relevant: sp.csr_matrix, k: int) -> float:
    """Share of users with at least one relevant item in their top k."""
    hits = hits_at_k(recommended, relevant, k)
    return _mean_over_relevant(np.asarray(hits.any(1), np.float64), _n_relevant(relevant))


def ranking_metrics(recommended: np.ndarray, relevant: sp.csr_matrix, k: int = 10) -> dict[str, float]:
    """All top-N metrics at ``k`` in one dict (keys like ``"recall@10"``)."""
    return {
        f"precision@{k}": precision_at_k(recommended, relevant, k),
        f"recall@{k}": recall_at_k(recommended, relevant, k),
        f"ndcg@{k}": ndcg_at_k(recommended, relevant, k),
        f"map@{k}": map_at_k(recommended, relevant, k),
        f"hit_rate@{k}": hit_rate_at_k(recommended, relevant, k),
        f"coverage@{k}": coverage(np.asarray(recommended)[:, :k], relevant.shape[1]),
    }


def coverage(recommended: np.ndarray, n_items: int) -> float:
    """Catalogue coverage: share of the ``n_items`` items recommended to anyone."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    rec = np.asarray(recommended).ravel()
    rec = rec[(rec >= 0) & (rec < n_items)]
    return float(len(np.unique(rec)) / n_items)


# -------------------------------------------------------------- ANN quality
def ann_recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k ids that the approximate top-k also returned.

    Both are ``[n_queries, >=k]`` id arrays (``-1`` = no result, never counted).
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx_ids {a.shape} and exact_ids {e.shape} must be [n_queries, k]")
    if not 1 <= k <= min(a.shape[1], e.shape[1]):
        raise ValueError(f"k={k} exceeds the result width ({a.shape[1]}, {e.shape[1]})")
    a, e = a[:, :k], e[:, :k]
    match = (a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)
    return float(match.any(axis=1).sum(1).mean() / k)


def relevant_matrix(test, min_rating: float | str | None = "auto") -> sp.csr_matrix:
    """Relevance CSR ``[n_users, n_items]`` from a test :class:`~engine.data.Dataset`:
    the test interactions rated at least ``min_rating``, all of them when ``None``, and
    with ``"auto"`` the data's own rule — its likes (:meth:`~engine.data.Dataset.liked`:
    every interaction of implicit data, else ratings of at least 4)."""
    if min_rating == "auto":
        keep = test.liked()
    elif min_rating is None:
        keep = np.ones(test.n_ratings, bool)
    else:
        keep = test.ratings >= float(min_rating)
    m = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (test.user_idx[keep], test.item_idx[keep])),
        shape=(test.n_users, test.n_items),
    )
    m.sum_duplicates()
    return m
