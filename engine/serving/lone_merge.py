"""A lone request's candidates in two compiled loops.

The generic retrieval path (:mod:`engine.serving.retrieval`) serves any batch with array
operations. For one user that is some 30 NumPy calls of a few microseconds each, and
their fixed costs, not the data, are most of a ``Recommend`` request's CPU time. Here the
same rules run as two loops compiled with numba, over the ANN sources' result lists and
the table sources' rows:

- ``popular`` and ``segment`` propose the first ``quota`` allowed items of the popularity
  order and of the user's segment row, as their ``propose_alone`` does;
- ``recent`` proposes the neighbours of each recent like from the bundle's table,
  round-robin over the likes, duplicates dropped, as
  :meth:`engine.serving.retrieval.RecentNeighboursSource.propose_alone` does;
- the lists are de-duplicated in the request's source order, every proposing source
  recorded as a bit, and the first ``n_candidates`` kept, as
  :func:`engine.serving.retrieval.merge` does.

"Allowed" reads the user's packed item bitmap (filters with the user's excluded items
cleared), the same one the FAISS searches use. The ANN searches stay FAISS calls, and a
recent like whose table row runs out of allowed items (heavy filters) is still searched
live by the source itself. Tests check that this path and the generic one give the same
candidates, sources and counts.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

from engine.serving.retrieval import Candidates, set_bits

# The kernels' source codes (0 = cf, ...): the order of their per-source quotas, bits and counts.
KERNEL_ORDER = ("cf", "towers", "popular", "segment", "recent")


@njit(cache=True)
def _allowed(bitmap: np.ndarray, everything: bool, item: int) -> bool:
    return everything or (bitmap[item >> 3] >> (item & 7)) & 1 == 1


@njit(cache=True)
def _propose(
    item: int, bit: int, position: np.ndarray, items: np.ndarray, bits: np.ndarray, n: int, n_candidates: int
) -> int:
    """Merge one proposal: a new item is appended while there is room (its position + 1
    is marked), a repeated one only gains the source's bit. Returns the new length.
    Compiled code has no bounds checks: an item outside the catalogue raises here
    instead of reading or writing past the scratch arrays."""
    if item < 0 or item >= position.shape[0]:
        raise IndexError("lone merge: a proposed item is outside the catalogue")
    at = position[item]
    if at > 0:
        bits[at - 1] |= bit
        return n
    if n < n_candidates:
        position[item] = n + 1
        items[n] = item
        bits[n] = bit
        return n + 1
    return n  # over the cap: not a candidate, so neither its bits nor a mark matter


@njit(cache=True)
def _recent_neighbours(neighbours, liked, quota, bitmap, everything, mark):
    """The recent source's list: each like's first allowed table neighbours, round-robin
    (the best of each like, then the second, ...), duplicates dropped, the first
    ``quota``. ``mark`` is a zeroed scratch array over the catalogue, left zeroed. Returns
    ``(items, needs_live_search)``: the latter where a like's row runs out of allowed
    items before its share while more neighbours exist beyond the table."""
    likes = liked[liked >= 0]
    picked = np.empty(quota, np.int64)
    if quota <= 0 or len(likes) == 0:
        return picked[:0], False
    per_like = -(-quota // len(likes))
    width = neighbours.shape[1]
    lists = np.empty((len(likes), per_like), np.int64)
    lengths = np.zeros(len(likes), np.int64)
    for a in range(len(likes)):
        if likes[a] >= neighbours.shape[0]:
            raise IndexError("lone merge: a recent like is outside the neighbour table")
        row = neighbours[likes[a]]
        for c in range(width):
            if lengths[a] >= per_like or row[c] < 0:  # -1 pads: no more neighbours
                break
            if row[c] >= mark.shape[0]:
                raise IndexError("lone merge: a neighbour is outside the catalogue")
            if _allowed(bitmap, everything, row[c]):
                lists[a, lengths[a]] = row[c]
                lengths[a] += 1
        if lengths[a] < per_like and width > 0 and row[width - 1] >= 0:
            return picked[:0], True
    n = 0
    for r in range(per_like):
        for a in range(len(likes)):
            if r < lengths[a] and n < quota and mark[lists[a, r]] == 0:
                mark[lists[a, r]] = 1
                picked[n] = lists[a, r]
                n += 1
    for c in range(n):
        mark[picked[c]] = 0
    return picked[:n], False


@njit(cache=True)
def _merge(
    order,
    source_bits,
    quota,
    cf,
    towers,
    recent,
    popular_order,
    segment_row,
    bitmap,
    everything,
    n_candidates,
    position,
    items,
    bits,
    counts,
):
    """Merge the sources in ``order`` (codes: 0 cf, 1 towers, 2 popular, 3 segment,
    4 recent): the given lists of cf, towers and recent, and the first ``quota[code]``
    allowed items of the popularity order and the segment row. Fills ``items`` / ``bits``
    and ``counts`` (proposals per code); returns the number of candidates. ``position``
    is a zeroed scratch array over the catalogue, left zeroed."""
    n = 0
    for code in order:
        bit = source_bits[code]
        if code == 2 or code == 3:  # a ranked table: its first allowed items
            ranked = popular_order if code == 2 else segment_row
            found = 0
            for item in ranked:
                if found >= quota[code]:
                    break
                if item < 0 or item >= position.shape[0]:
                    raise IndexError("lone merge: a ranked item is outside the catalogue")
                if _allowed(bitmap, everything, item):
                    n = _propose(item, bit, position, items, bits, n, n_candidates)
                    found += 1
            counts[code] = found
        else:
            given = cf if code == 0 else towers if code == 1 else recent
            for item in given:
                n = _propose(item, bit, position, items, bits, n, n_candidates)
            counts[code] = len(given)
    for c in range(n):
        position[items[c]] = 0
    return n


class LoneMerge:
    """The compiled merge of one user's candidates, with per-thread scratch space."""

    def __init__(self):
        self._local = threading.local()
        self._plans: dict = {}  # source names in merge order -> (kernel order, bits)

    def candidates(
        self, sources: dict, requests, quota: dict[str, int], n_candidates: int, n_items: int
    ) -> tuple[Candidates, dict[str, int]]:
        """The merged :class:`Candidates` of the lone request ``requests`` and how many
        items each source proposed. ``quota`` gives the sources in merge order (the
        request's source order) with their quotas, as the engine's quota split does."""
        names = tuple(quota)
        if names not in self._plans:
            self._plans[names] = (
                np.array([KERNEL_ORDER.index(name) for name in names], np.int64),
                np.array([1 << names.index(s) if s in names else 0 for s in KERNEL_ORDER], np.int64),
            )
        order, source_bits = self._plans[names]
        quotas = np.array([quota.get(name, 0) for name in KERNEL_ORDER], np.int64)
        lists = {
            name: sources[name].propose_alone(requests, 0, quota[name]).astype(np.int64, copy=False)
            if quota.get(name, 0) > 0
            else _NONE
            for name in ("cf", "towers")
        }
        bitmap = requests.lone_bitmap()
        everything, bitmap = bitmap is None, _ALL if bitmap is None else bitmap
        scratch = self._scratch(n_items, n_candidates)
        recent = _NONE
        if quota.get("recent", 0) > 0:
            table = sources["recent"].neighbours
            needs_live_search = table is None
            if table is not None:
                liked = requests.recent_liked[0].astype(np.int64, copy=False)
                recent, needs_live_search = _recent_neighbours(
                    table, liked, quota["recent"], bitmap, everything, scratch.mark
                )
            if needs_live_search:  # rare: heavy filters; the source searches the cf_l2 index
                recent = sources["recent"].propose_alone(requests, 0, quota["recent"]).astype(np.int64, copy=False)
        segment_row = _NONE
        if quota.get("segment", 0) > 0:
            segment = sources["segment"]
            segment_row = segment.top_items[requests.segments[segment.key][0]].astype(np.int64, copy=False)
        counts = np.zeros(len(KERNEL_ORDER), np.int64)
        n = _merge(
            order,
            source_bits,
            quotas,
            lists["cf"],
            lists["towers"],
            recent,
            sources["popular"].order,
            segment_row,
            bitmap,
            everything,
            n_candidates,
            scratch.position,
            scratch.items,
            scratch.bits,
            counts,
        )
        proposed = {name: int(counts[KERNEL_ORDER.index(name)]) for name in names}
        return Candidates(
            np.zeros(n, np.int64), scratch.items[:n].copy(), scratch.bits[:n].astype(np.uint32), names
        ), proposed

    def warm_up(self, sources: dict, n_items: int) -> None:
        """Compile the kernels for these sources' array types now (or load them from
        numba's cache), so that no request waits for the compiler."""
        scratch = self._scratch(n_items, 1)
        set_bits(scratch.mark, _NONE, False)  # what a lone request's bitmap is updated with
        recent = sources.get("recent")
        if recent is not None and recent.neighbours is not None:
            _recent_neighbours(recent.neighbours, _NONE, 0, _ALL, True, scratch.mark)
        zeros = np.zeros(len(KERNEL_ORDER), np.int64)
        _merge(
            np.arange(len(KERNEL_ORDER)),
            zeros,
            zeros,
            _NONE,
            _NONE,
            _NONE,
            sources["popular"].order,
            _NONE,
            _ALL,
            True,
            1,
            scratch.position,
            scratch.items,
            scratch.bits,
            zeros.copy(),
        )

    def _scratch(self, n_items: int, n_candidates: int):
        scratch = self._local
        if getattr(scratch, "n_items", None) != n_items:  # first use, or items were added
            scratch.position = np.zeros(n_items, np.int32)
            scratch.mark = np.zeros(n_items, np.uint8)
            scratch.n_items = n_items
        if len(getattr(scratch, "items", ())) < n_candidates:
            scratch.items = np.empty(n_candidates, np.int64)
            scratch.bits = np.empty(n_candidates, np.int64)
        return scratch


_NONE = np.zeros(0, np.int64)
_ALL = np.zeros(1, np.uint8)  # stands in for the bitmap of a user who may see every item
