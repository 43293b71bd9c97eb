"""The history-dependent ranker features as loops compiled with numba.

Each of these features of (user, candidate) pairs reads the user's history: co-occurrence
and EASE weights from the history into the candidate, the similarity of the candidate to
the user's recent likes, and the share of the history sharing the candidate's attribute
values. In NumPy they take some 15 calls per table or attribute, whose fixed costs are
most of a ``Recommend`` request's feature time: in the gRPC server, where each call also
contends for the GIL with gRPC's threads, the features cost more than the rest of the
request. Here each is one call over the pairs, grouped by user (``rows`` ascending), with
the GIL released; a lone request and a batch run the same code, so they agree exactly.
The definitions are :mod:`engine.serving.features`'s, and its tests check them.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def weights_from_history(
    neighbours: np.ndarray,
    weights: np.ndarray,
    indptr: np.ndarray,
    history: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    n_items: int,
) -> np.ndarray:
    """Per pair, the sum of ``weights[i, k]`` over the ``k`` whose ``neighbours[i, k]``
    lies in user ``rows[j]``'s history (``indptr``/``history``), ``i = items[j]``; NaN
    for a user with no history or an item beyond the table."""
    out = np.full(len(rows), np.nan, np.float32)
    n_table, width = neighbours.shape
    marked = np.zeros(n_items + 1, np.bool_)
    j = 0
    while j < len(rows):
        user = rows[j]
        end = j
        while end < len(rows) and rows[end] == user:
            end += 1
        start, stop = indptr[user], indptr[user + 1]
        if stop > start:
            for h in range(start, stop):
                if history[h] < n_items:
                    marked[history[h]] = True
            for r in range(j, end):
                item = items[r]
                if item < n_table:
                    total = np.float32(0.0)
                    for k in range(width):
                        other = neighbours[item, k]
                        if other >= 0 and marked[other]:
                            total += weights[item, k]
                    out[r] = total
            for h in range(start, stop):
                if history[h] < n_items:
                    marked[history[h]] = False
        j = end
    return out


@njit(cache=True, nogil=True)
def recent_similarity(
    unit: np.ndarray, liked: np.ndarray, rows: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the largest and the mean cosine of item ``items[j]``'s unit vector to
    those of user ``rows[j]``'s recent likes (``liked[u]``, -1 pads); NaN without likes
    or for an item beyond ``unit``."""
    largest = np.full(len(rows), np.nan, np.float32)
    mean = np.full(len(rows), np.nan, np.float32)
    n_unit, dim = unit.shape
    for r in range(len(rows)):
        item = items[r]
        if item >= n_unit:
            continue
        best = np.float32(-np.inf)
        total = np.float32(0.0)
        count = 0
        for like in liked[rows[r]]:
            if like < 0 or like >= n_unit:
                continue
            dot = np.float32(0.0)
            for d in range(dim):
                dot += unit[item, d] * unit[like, d]
            best = max(best, dot)
            total += dot
            count += 1
        if count:
            largest[r] = best
            mean[r] = total / np.float32(count)
    return largest, mean


@njit(cache=True, nogil=True)
def label_affinity(flags: np.ndarray, indptr: np.ndarray, history: np.ndarray, rows: np.ndarray, items: np.ndarray):
    """Per pair, the share of user ``rows[j]``'s history carrying each of item
    ``items[j]``'s labels (``flags`` ``[n_items, L]`` 0/1), averaged over its labels; NaN
    for a user with no history."""
    out = np.full(len(rows), np.nan, np.float32)
    n_labels = flags.shape[1]
    profile = np.zeros(n_labels, np.float32)
    j = 0
    while j < len(rows):
        user = rows[j]
        end = j
        while end < len(rows) and rows[end] == user:
            end += 1
        start, stop = indptr[user], indptr[user + 1]
        if stop > start:
            profile[:] = 0.0
            for h in range(start, stop):
                for label in range(n_labels):
                    profile[label] += flags[history[h], label]
            for r in range(j, end):
                matched = np.float32(0.0)
                n_own = np.float32(0.0)
                for label in range(n_labels):
                    if flags[items[r], label]:
                        matched += profile[label]
                        n_own += 1
                out[r] = matched / max(n_own, np.float32(1.0)) / np.float32(stop - start)
        j = end
    return out


@njit(cache=True, nogil=True)
def code_affinity(
    codes: np.ndarray, width: int, indptr: np.ndarray, history: np.ndarray, rows: np.ndarray, items: np.ndarray
):
    """Per pair, the share of user ``rows[j]``'s history with item ``items[j]``'s code of
    a categorical attribute (``codes``, -1 missing: a share of 0); NaN for a user with no
    history."""
    out = np.full(len(rows), np.nan, np.float32)
    counts = np.zeros(width, np.float32)
    j = 0
    while j < len(rows):
        user = rows[j]
        end = j
        while end < len(rows) and rows[end] == user:
            end += 1
        start, stop = indptr[user], indptr[user + 1]
        if stop > start:
            counts[:] = 0.0
            for h in range(start, stop):
                code = codes[history[h]]
                if code >= 0:
                    counts[code] += 1
            for r in range(j, end):
                code = codes[items[r]]
                share = counts[code] if code >= 0 else np.float32(0.0)
                out[r] = share / np.float32(stop - start)
        j = end
    return out
