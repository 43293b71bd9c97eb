"""The ranker's features of (user, candidate) pairs as loops compiled with numba.

In NumPy, :mod:`engine.serving.features` took some 40 small calls per request, whose
fixed costs were most of a ``Recommend`` request's feature time; in the gRPC server,
where each call also contends for the GIL with gRPC's threads, the features cost more
than the rest of the request. Here:

- :func:`pair_columns` reads the per-pair columns off arrays in one pass (source flags,
  position, popularity, trend, age, user activity, like rate, mean rating), and
  :func:`segment_counts` the item's popularity in the user's segment;
- the features that read the user's history are one call each over the pairs, grouped by
  user (``rows`` ascending): co-occurrence and EASE weights from the history into the
  candidate (:func:`weights_from_history`), the similarity to the recent likes, and the
  share of the history sharing the candidate's attribute values.

Every kernel releases the GIL, and a lone request and a batch run the same code, so they
agree exactly. The definitions are :mod:`engine.serving.features`'s, and its tests check
them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.serving.ranking import row_dot


@njit(cache=True, nogil=True)
def _group_end(rows: np.ndarray, start: int) -> int:
    """Where the run of pairs of user ``rows[start]`` ends (``rows`` ascending)."""
    end = start
    while end < len(rows) and rows[end] == rows[start]:
        end += 1
    return end


@njit(cache=True, nogil=True)
def weights_from_history(
    neighbours: np.ndarray,
    weights: np.ndarray,
    indptr: np.ndarray,
    history: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    marked: np.ndarray,
) -> np.ndarray:
    """Per pair, the sum of ``weights[i, k]`` over the ``k`` whose ``neighbours[i, k]``
    lies in user ``rows[j]``'s history (``indptr``/``history``), ``i = items[j]``; NaN
    for a user with no history or an item beyond the table. ``marked``: ``[n_items + 1]``
    bool scratch, all False, left all False (a request's tables share one)."""
    out = np.full(len(rows), np.nan, np.float32)
    n_table, width = neighbours.shape
    if n_table == 0:  # no table (EASE above its catalogue size): every value missing
        return out
    n_items = len(marked) - 1
    j = 0
    while j < len(rows):
        user, end = rows[j], _group_end(rows, j)
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
        user, end = rows[j], _group_end(rows, j)
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
        user, end = rows[j], _group_end(rows, j)
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


@njit(cache=True, nogil=True)
def pair_columns(
    rows: np.ndarray,
    items: np.ndarray,
    positions: np.ndarray,
    source_bits: np.ndarray,
    shifts: np.ndarray,
    popularity: np.ndarray,
    trend_age: np.ndarray,
    rates: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """The per-pair columns read off arrays, ``[n, len(shifts) + 8]`` float32, in order:
    a flag per source (bit ``shifts[s]`` of ``source_bits``; 0 where ``shifts[s]`` is -1),
    the number of sources, the candidate position, ``log1p`` of the item's popularity, its
    trend and age (0 and 0 beyond the table: added live), ``log1p`` of the user's history
    length, and the item's like rate and mean rating (NaN beyond their table)."""
    n_sources = len(shifts)
    out = np.empty((len(rows), n_sources + 8), np.float32)
    for r in range(len(rows)):
        item = items[r]
        count = 0
        for s in range(n_sources):
            flag = 0
            if shifts[s] >= 0:
                flag = (source_bits[r] >> shifts[s]) & 1
            out[r, s] = flag
            count += flag
        c = n_sources
        out[r, c] = count
        out[r, c + 1] = positions[r]
        out[r, c + 2] = np.log1p(popularity[item])
        if item < trend_age.shape[0]:
            out[r, c + 3] = trend_age[item, 0]
            out[r, c + 4] = trend_age[item, 1]
        else:
            out[r, c + 3] = 0.0
            out[r, c + 4] = 0.0
        out[r, c + 5] = np.log1p(np.float64(lengths[rows[r]]))
        if item < rates.shape[0]:
            out[r, c + 6] = rates[item, 0]
            out[r, c + 7] = rates[item, 1]
        else:
            out[r, c + 6] = np.nan
            out[r, c + 7] = np.nan
    return out


@njit(cache=True, nogil=True)
def segment_counts(keys: np.ndarray, counts: np.ndarray, segments: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per pair, the item's count in its user's segment (``counts`` of the sorted
    ``segment * 2**31 + item`` ``keys``; 0 when absent), NaN for a user without segment."""
    out = np.empty(len(items), np.float32)
    for r in range(len(items)):
        segment = segments[r]
        if segment < 0:
            out[r] = np.nan
            continue
        wanted = np.int64(segment) * np.int64(2**31) + items[r]
        at = np.searchsorted(keys, wanted)
        out[r] = counts[at] if at < len(keys) and keys[at] == wanted else 0.0
    return out


@njit(cache=True, nogil=True)
def predicted_ratings(
    item_vectors: np.ndarray,
    user_vectors: np.ndarray,
    user_bias: np.ndarray,
    item_offsets: np.ndarray,
    users: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    low: float,
    high: float,
) -> np.ndarray:
    """A rating model's prediction of each pair (user ``users[rows[j]]``, item
    ``items[j]``): ``w(u) . x(i) + b(u) + offset(i)`` clipped to ``[low, high]``; NaN for
    a user it does not know (-1 or beyond its table) or an item beyond its table."""
    out = np.empty(len(rows), np.float32)
    for j in range(len(rows)):
        u, i = users[rows[j]], items[j]
        if u < 0 or u >= len(user_vectors) or i >= len(item_vectors):
            out[j] = np.nan
            continue
        out[j] = min(max(row_dot(item_vectors, i, user_vectors, u) + user_bias[u] + item_offsets[i], low), high)
    return out
