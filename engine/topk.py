"""Exact top-k selection over score arrays: one list (:func:`top_k_desc`) or many
lists grouped by row (:func:`top_k_per_row`). Best first, ties by lower index, NaN last:
every ranking in Tandem (models, indexes, serving) selects through these."""

from __future__ import annotations

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


def top_k_rows(scores: np.ndarray, k: int, excluded=None, rows=None) -> np.ndarray:
    """Each row's ``k`` best columns ``[n, k]`` (best first, ties by lower column, ``-1``
    padding a row with fewer than ``k`` finite scores). ``excluded`` (a CSR matrix, one
    row per entity) drops, for row ``j``, the columns of its row ``rows[j]`` (default
    ``j``). ``scores`` is modified in place where columns are excluded. The exact top-k
    of every brute-force ranking (models, evaluation peers, the exact vector index)."""
    n = len(scores)
    out = np.full((n, k), -1, np.int64)
    for j in range(n):
        values = scores[j]
        if excluded is not None:
            r = j if rows is None else rows[j]
            values[excluded.indices[excluded.indptr[r] : excluded.indptr[r + 1]]] = -np.inf
        top = top_k_desc(values, k)
        top = top[np.isfinite(values[top])]
        out[j, : len(top)] = top
    return out
