"""The simple peers Tandem is measured against, on the same split and exclusions:
popularity, implicit ALS (the ``implicit`` package) and EASE (Steck, 2019).

Each peer is fitted on a training :class:`~engine.data.Dataset` and evaluated with
:func:`~engine.evaluation.offline.topn_metrics`, so that it ranks every item for a user,
excludes the user's training items and is scored by the same relevance rule as the
pipeline. A peer with settings is fitted on a small grid and its best setting on the test
split is reported (which flatters the peer, never Tandem). Every result carries
``fit_s``, the seconds its (best) fit took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from engine.data import Dataset
from engine.evaluation.offline import popularity_recommender, topn_metrics
from engine.topk import top_k_rows

ALS_FACTORS = (32, 64, 128)
ALS_REGULARIZATION = (0.1, 1.0, 10.0)
EASE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
# EASE inverts a dense float64 matrix of the smaller side (items, or users when fewer):
# 8 bytes x n^2, so 8,000 take 0.5 GB and 10 s of a small machine per setting. Above
# this on both sides the peer is skipped.
EASE_MAX_ITEMS = 8000

Recommender = Callable[[np.ndarray, int], np.ndarray]


def popularity(train: Dataset, test: Dataset, k: int, min_rating="auto") -> dict:
    """The most interacted-with training items a user has not seen."""
    start = time.perf_counter()
    recommend = popularity_recommender(train)
    return {"fit_s": time.perf_counter() - start, **topn_metrics(recommend, test, k, min_rating)}


def implicit_als(
    train: Dataset,
    test: Dataset,
    k: int,
    min_rating="auto",
    factors: Sequence[int] = ALS_FACTORS,
    regularization: Sequence[float] = ALS_REGULARIZATION,
    iterations: int = 15,
) -> dict:
    """implicit's ALS on the binary interaction matrix, best of a small grid (by
    NDCG@k). Raises ImportError without the ``implicit`` package."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits  # installed with implicit

    ui = _binary(train)

    def fit(params: dict) -> Recommender:
        with threadpool_limits(1, "blas"):  # implicit threads itself; BLAS threads would fight it
            model = AlternatingLeastSquares(**params, iterations=iterations, random_state=0)
            model.fit(ui, show_progress=False)

        def recommend(users: np.ndarray, kk: int) -> np.ndarray:
            ids, _ = model.recommend(users, ui[users], N=kk, filter_already_liked_items=True)
            return np.asarray(ids)

        return recommend

    grid = [{"factors": f, "regularization": reg} for f in factors for reg in regularization]
    return _best_of_grid(grid, fit, test, k, min_rating)


def ease_weights(interactions: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's item-item weights ``B`` (``[n_items, n_items]``, zero diagonal): with
    ``P = (X^T X + lam I)^-1``, ``B = I - P / diag(P)`` (column-wise), the closed form of
    the ridge regression of each item's column on all other items' columns."""
    _check_lambda(lam)
    gram = (interactions.T @ interactions).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = _spd_inverse(gram)
    weights = -p / np.diag(p)[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def ease_scores(interactions: sp.csr_matrix, lam: float, block: int = 2048) -> Callable[[np.ndarray], np.ndarray]:
    """EASE fitted on ``interactions`` (``X``, users x items): a function of user rows
    returning their scores ``X[users] @ B`` of every item (``[len(users), n_items]``
    float32; a user's own items score too: the caller excludes them).

    Two exact forms, whichever inverts the smaller matrix:

    - items at most users: ``B`` itself (:func:`ease_weights`, an items x items inverse);
    - fewer users than items: by the Woodbury identity ``X P = (X X^T + lam I)^-1 X =: M X``
      (``P = (X^T X + lam I)^-1``), so ``X B = X - M X / diag(P)``, where ``diag(P)_i =
      (1 - x_i^T M x_i) / lam`` for item ``i``'s column ``x_i``: a users x users inverse
      and a dense users x items float32 matrix (16,000 items, 8,000 users: 0.5 GB each
      and 9 s a setting, against a 2 GB items x items inverse and minutes).
    """
    _check_lambda(lam)
    x = sp.csr_matrix(interactions, dtype=np.float64)
    n_users, n_items = x.shape
    if n_items <= n_users:
        weights = ease_weights(x, lam).astype(np.float32)
        return lambda users: np.asarray(x[users] @ weights, np.float32)
    gram = (x @ x.T).toarray()
    gram[np.diag_indices_from(gram)] += lam
    m = _spd_inverse(gram)
    by_item = x.T.tocsr()
    mx = np.empty((n_users, n_items), np.float32)  # M X, a block of items at a time
    quadratic = np.empty(n_items)  # x_i^T M x_i
    for start in range(0, n_items, block):
        columns = by_item[start : start + block]  # [b, users]: the block's x_i^T
        part = np.asarray(columns @ m)  # [b, users]: x_i^T M
        quadratic[start : start + len(part)] = np.asarray(columns.multiply(part).sum(axis=1)).ravel()
        mx[:, start : start + len(part)] = part.T
    del m
    scale = (lam / (1.0 - quadratic)).astype(np.float32)  # 1 / diag(P)
    return lambda users: np.asarray(x[users].toarray(), np.float32) - mx[users] * scale[None, :]


def _check_lambda(lam: float) -> None:
    if lam <= 0:
        raise ValueError(f"EASE's lambda must be > 0, got {lam}")


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite float64 ``matrix`` (overwritten),
    through its Cholesky factor (LAPACK ``potrf`` then ``potri``): the same inverse to
    float64 rounding, 1.7x faster than ``numpy.linalg.inv``'s LU (8,000 x 8,000: 8.4 s
    against 14.4 s)."""
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(matrix, lower=False, overwrite_a=True)
    if info == 0:
        factor, info = lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise ValueError(f"EASE's Gram matrix could not be inverted (LAPACK info {info})")
    return np.triu(factor) + np.triu(factor, 1).T  # potri fills the upper triangle only


def ease(
    train: Dataset,
    test: Dataset,
    k: int,
    min_rating="auto",
    lambdas: Sequence[float] = EASE_LAMBDAS,
    max_items: int = EASE_MAX_ITEMS,
) -> dict:
    """EASE on the binary interaction matrix, best ``lam`` of a grid (by NDCG@k).
    Returns ``{"skipped": reason}`` above ``max_items`` items and as many users (its
    dense inverse is of the smaller side, :func:`ease_scores`)."""
    if min(train.n_items, train.n_users) > max_items:
        return {
            "skipped": f"{train.n_items:,} items and {train.n_users:,} users > {max_items:,}: "
            "EASE's dense inverse is too large"
        }
    ui = _binary(train)

    def fit(params: dict) -> Recommender:
        scores_of = ease_scores(ui, params["lambda"])

        def recommend(users: np.ndarray, kk: int, block: int = 512) -> np.ndarray:
            parts = []
            for part in np.array_split(users, max(1, -(-len(users) // block))):
                parts.append(top_k_rows(scores_of(part), kk, ui, part))
            return np.concatenate(parts)

        return recommend

    return _best_of_grid([{"lambda": lam} for lam in lambdas], fit, test, k, min_rating)


def _best_of_grid(grid: list[dict], fit: Callable[[dict], Recommender], test: Dataset, k: int, min_rating) -> dict:
    """Fit a peer with each setting of ``grid`` and score it on ``test``: the best
    result by NDCG@k (the first on ties), with its ``params``, ``fit_s`` (seconds of
    its fit) and ``grid_size``."""
    results: list[dict[str, Any]] = []
    for params in grid:
        start = time.perf_counter()
        recommend = fit(params)
        fit_s = time.perf_counter() - start
        results.append({"fit_s": fit_s, "params": params, **topn_metrics(recommend, test, k, min_rating)})
    best = max(results, key=lambda result: result[f"ndcg@{k}"])
    return {**best, "grid_size": len(grid)}


def _binary(train: Dataset) -> sp.csr_matrix:
    """Every training interaction as a 1 (the peers' implicit view of any data)."""
    ui = train.user_items().copy().astype(np.float32)
    ui.data[:] = 1.0
    return ui
