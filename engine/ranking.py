"""Exact ranking: top-k selection, and the blend of a candidate's two-tower score and
CF prediction, each standardised with statistics fixed per bundle, with configurable
weights.

Standardising with bundle-wide statistics (not per request) keeps a pair's score the
same whatever else is being ranked, so ``score`` of a few items, ``recommend`` and
``recommend_batch`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit


def top_k_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first (ties by lower index, also at the
    k-th place; NaN last)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64)
    if n <= 4096:
        if k <= 64:  # one request's candidates: one compiled pass
            top, has_nan = _top_k_by_insertion(scores, k)
            if not has_nan:
                return top
        return np.argsort(-scores, kind="stable")[:k]  # cheaper than selection at this size
    if np.isnan(scores).any():  # NaN ranks last in the sort; partition would put it first
        return np.argsort(-scores, kind="stable")[:k]
    kth = np.partition(scores, n - k)[n - k]
    chosen = np.flatnonzero(scores >= kth)  # the k best, and any ties with the k-th
    return chosen[np.lexsort((chosen, -scores[chosen]))][:k]


@njit(cache=True)
def _top_k_by_insertion(scores: np.ndarray, k: int):
    """:func:`top_k_desc` for small ``k``: a sorted buffer of the best ``k`` so far, each
    score inserted after those at least as large, so ties keep the lower index first.
    ``O(n k)`` at worst, one comparison per score when most miss the buffer. Returns
    ``(indices, has_nan)``; with a NaN the caller sorts instead."""
    best = np.empty(k, np.int64)
    m = 0
    for i in range(len(scores)):
        s = scores[i]
        if s != s:
            return best[:0], True
        if m < k:
            j = m
            m += 1
        elif s > scores[best[k - 1]]:
            j = k - 1
        else:
            continue
        while j > 0 and scores[best[j - 1]] < s:
            best[j] = best[j - 1]
            j -= 1
        best[j] = i
    return best, False


@dataclass
class ScoreScale:
    """Mean and standard deviation of one score over (user, item) pairs of the bundle."""

    mean: float
    std: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (scores - self.mean) / self.std

    @classmethod
    def fit(cls, samples: np.ndarray) -> "ScoreScale":
        samples = np.asarray(samples, np.float64).ravel()
        std = float(samples.std()) if samples.size > 1 else 1.0
        return cls(float(samples.mean()) if samples.size else 0.0, std if std > 1e-9 else 1.0)


@dataclass
class BlendWeights:
    """Weights of the standardised tower score and CF prediction for known users; users
    unknown to CF are ranked by the tower score alone."""

    towers: float = 0.5
    cf: float = 0.5

    def __post_init__(self) -> None:
        if self.towers < 0 or self.cf < 0 or self.towers + self.cf == 0:
            raise ValueError(f"blend weights must be >= 0 and not both 0, got towers={self.towers}, cf={self.cf}")


@dataclass
class FoldedBlend:
    """The blend of one or many users, folded into per-user factors (``[U]`` arrays, or
    scalars for one user) so that ranking costs two dot products per candidate:

        score = tower . (tower_factor * u_tower) + tower_const
              + cf_item . (cf_factor * u_cf) + cf_factor * cf_offset + cf_const

    which is, exactly in real arithmetic, ``(w_t * z_tower + w_c * z_cf) / (w_t + w_c)``
    with ``z`` the standardised tower score and CF prediction ``u_cf . cf_item + bias +
    cf_offset``, and ``w_t`` / ``w_c`` zero where the user lacks that component. ``none``
    marks users with neither (ranked by a fallback score instead)."""

    tower_factor: np.ndarray
    tower_const: np.ndarray
    cf_factor: np.ndarray
    cf_const: np.ndarray
    none: np.ndarray

    @classmethod
    def of(cls, has_tower: np.ndarray, has_cf: np.ndarray, cf_bias: np.ndarray, weights: BlendWeights,
           tower_scale: ScoreScale, cf_scale: ScoreScale) -> "FoldedBlend":
        w_tower = np.where(has_tower, weights.towers, 0.0)
        w_cf = np.where(has_cf, weights.cf, 0.0)
        total = w_tower + w_cf
        none = total == 0
        total = np.where(none, 1.0, total)
        tower_factor = w_tower / (total * tower_scale.std)
        cf_factor = w_cf / (total * cf_scale.std)
        return cls(tower_factor, -tower_factor * tower_scale.mean, cf_factor,
                   cf_factor * (np.asarray(cf_bias, np.float64) - cf_scale.mean), none)

    @classmethod
    def of_one(cls, has_tower: bool, has_cf: bool, cf_bias: float, weights: BlendWeights,
               tower_scale: ScoreScale, cf_scale: ScoreScale) -> "FoldedBlend":
        """The same for one user, with Python floats (a lone request's few operations)."""
        w_tower, w_cf = weights.towers * has_tower, weights.cf * has_cf
        total = (w_tower + w_cf) or 1.0
        tower_factor, cf_factor = w_tower / (total * tower_scale.std), w_cf / (total * cf_scale.std)
        return cls(tower_factor, -tower_factor * tower_scale.mean, cf_factor, cf_factor * (cf_bias - cf_scale.mean),
                   w_tower + w_cf == 0)


def top_k_per_row(rows: np.ndarray, scores: np.ndarray, k: int, n_rows: int) -> np.ndarray:
    """Positions of each row's ``k`` largest scores, for entries grouped by row (``rows``
    ascending): rows in order, best first, ties by lower position (as :func:`top_k_desc`)."""
    if len(rows) == 0 or k <= 0:
        return np.zeros(0, np.int64)
    if rows[0] == rows[-1]:  # one row (a lone request)
        return top_k_desc(scores, k)
    counts = np.bincount(rows, minlength=n_rows)
    width = int(counts.max())
    grid = np.full((n_rows, width), -np.inf, np.float32)
    grid[rows, np.arange(len(rows)) - np.searchsorted(rows, rows)] = scores
    kept = min(k, width)
    threshold = np.partition(grid, width - kept, axis=1)[:, width - kept]  # each row's k-th best
    chosen = np.flatnonzero(scores >= threshold[rows])  # the k best, and any ties with the k-th
    chosen = chosen[np.lexsort((chosen, -scores[chosen], rows[chosen]))]
    return chosen[np.arange(len(chosen)) - np.searchsorted(rows[chosen], rows[chosen]) < k]
