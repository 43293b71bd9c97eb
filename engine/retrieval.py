"""Candidate retrieval: named sources, each proposing item indices for one request, and
their merge with per-source quotas.

Every source sees the same :class:`Request` — who the user is (as vectors and tables),
and ``allowed``, the boolean mask of items that may be returned (seen items, block-list,
allow-list and attribute filters already applied). ANN sources pass ``allowed`` to FAISS
as an ``IDSelectorBitmap`` so that filtering happens *inside* the search and a full
quota still comes back when enough items qualify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    """One user's retrieval context. Fields a user lacks are ``None``."""

    allowed: np.ndarray  # [n_items] bool
    cf_query: np.ndarray | None = None  # [f + 1]: [w, 1] against the cf_ip index
    tower_vector: np.ndarray | None = None  # [d] user-tower output
    segments: dict[str, int] = field(default_factory=dict)  # segment key -> segment index
    recent_liked: np.ndarray | None = None  # item indices, latest first
    n_excluded: int = 0  # items this user excludes beyond the request's filters (at most)

    _selector: object = None

    def selector(self):
        """The FAISS selector for ``allowed`` (built once per request)."""
        if self._selector is None:
            import faiss

            bits = np.packbits(self.allowed, bitorder="little")
            self._bits = bits  # FAISS keeps a pointer: keep the buffer alive
            self._selector = faiss.IDSelectorBitmap(len(self.allowed), faiss.swig_ptr(bits))
        return self._selector


def search_params(tuned: dict, selector):
    """FAISS search parameters: the index's tuned ``efSearch``/``nprobe`` and a selector."""
    import faiss

    if "efSearch" in tuned:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(tuned["efSearch"]))
    if "nprobe" in tuned:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(tuned["nprobe"]))
    return faiss.SearchParameters(sel=selector)


def ann_search(index, tuned: dict, query: np.ndarray, k: int, request: Request) -> np.ndarray:
    """Labels of the top ``k`` allowed items for one query (fewer when fewer qualify)."""
    if k <= 0:
        return np.zeros(0, np.int64)
    params = search_params(tuned, request.selector())
    _, labels = index.search(np.ascontiguousarray(query[None, :], np.float32), k, params=params)
    labels = labels[0]
    return labels[labels >= 0]


class Source:
    """A named candidate source. ``propose`` returns item indices, best first."""

    name = "source"

    def available(self, request: Request) -> bool:
        return True

    def propose(self, request: Request, k: int) -> np.ndarray:
        raise NotImplementedError


class _AnnSource(Source):
    """ANN search over one index with a per-user query vector (``_query``)."""

    def __init__(self, index, tuned: dict):
        self.index, self.tuned = index, tuned

    def query(self, request: Request) -> np.ndarray | None:
        raise NotImplementedError

    def available(self, request: Request) -> bool:
        return self.query(request) is not None

    def propose(self, request: Request, k: int) -> np.ndarray:
        return ann_search(self.index, self.tuned, self.query(request), k, request)


class CFSource(_AnnSource):
    """ANN over CF item vectors with the user's CF vector (inner product with the bias
    folded in, so the order is the CF prediction's)."""

    name = "cf"

    def query(self, request: Request) -> np.ndarray | None:
        return request.cf_query


class TowerSource(_AnnSource):
    """ANN over item-tower vectors with the user-tower vector."""

    name = "towers"

    def query(self, request: Request) -> np.ndarray | None:
        return request.tower_vector


def _first_allowed(order: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` entries of a ranked item list that are allowed. Scans growing
    prefixes, so the usual case (few items excluded) touches only a few hundred entries."""
    found, start, width = [], 0, max(4 * k, 256)
    while start < len(order) and sum(len(f) for f in found) < k:
        part = order[start:start + width]
        found.append(part[allowed[part]])
        start, width = start + width, width * 4
    return np.concatenate(found)[:k] if found else np.zeros(0, np.int64)


class PopularitySource(Source):
    """The most interacted-with items overall."""

    name = "popular"

    def __init__(self, popularity: np.ndarray):
        self.order = np.argsort(-popularity, kind="stable")

    def propose(self, request: Request, k: int) -> np.ndarray:
        return _first_allowed(self.order, request.allowed, k)


class SegmentSource(Source):
    """The most interacted-with items among users of the same segment (e.g. the same
    zip region, occupation or age band)."""

    name = "segment"

    def __init__(self, key: str, top_items: np.ndarray):
        self.key, self.top_items = key, top_items  # [n_segments, top_n]

    def available(self, request: Request) -> bool:
        return self.key in request.segments

    def propose(self, request: Request, k: int) -> np.ndarray:
        return _first_allowed(self.top_items[request.segments[self.key]], request.allowed, k)


class RecentNeighboursSource(Source):
    """Squared-distance neighbours (CF item vectors) of the user's most recent likes,
    interleaved so every recent like contributes.

    Neighbours come from the bundle's precomputed ``neighbours`` table (``[n_items, m]``,
    nearest first, the item itself excluded, ``-1`` pads); a like whose table row runs out
    of allowed items (heavy filters) is searched live in the ``cf_l2`` index instead.
    """

    name = "recent"

    def __init__(self, index, tuned: dict, item_vectors: np.ndarray, neighbours: np.ndarray | None = None):
        self.index, self.tuned, self.item_vectors = index, tuned, item_vectors
        self.neighbours = neighbours

    def available(self, request: Request) -> bool:
        return request.recent_liked is not None and len(request.recent_liked) > 0

    def _lists(self, liked: np.ndarray, per_item: int, request: Request) -> list[np.ndarray]:
        if self.neighbours is None:
            return [ann_search(self.index, self.tuned, self.item_vectors[i], per_item, request) for i in liked]
        rows = self.neighbours[liked]
        valid = rows >= 0
        valid[valid] = request.allowed[rows[valid]]
        lists = []
        for row, ok, i in zip(rows, valid, liked):
            found = row[ok][:per_item]
            if len(found) < per_item and row[-1] >= 0:  # the table ran out under filters
                found = ann_search(self.index, self.tuned, self.item_vectors[i], per_item + 1, request)
                found = found[found != i][:per_item]
            lists.append(found)
        return lists

    def propose(self, request: Request, k: int) -> np.ndarray:
        liked = request.recent_liked
        per_item = max(1, -(-k // len(liked)))
        lists = self._lists(liked, per_item, request)
        width = max(len(x) for x in lists)
        padded = np.full((len(lists), width), -1, np.int64)
        for row, x in enumerate(lists):
            padded[row, :len(x)] = x
        merged = padded.T.ravel()  # round-robin: the best neighbour of each like first
        merged = merged[merged >= 0]
        _, first = np.unique(merged, return_index=True)
        return merged[np.sort(first)][:k]


@dataclass
class Candidates:
    """The merged candidate set: item indices, and for each a bit mask of the sources
    (bit ``j`` = ``names[j]``) that proposed it."""

    items: np.ndarray  # [n] int64
    source_bits: np.ndarray  # [n] uint32
    names: tuple[str, ...]

    def sources_at(self, positions) -> list[tuple[str, ...]]:
        """The names of the sources that proposed the candidates at ``positions``."""
        return [tuple(name for j, name in enumerate(self.names) if bits >> j & 1)
                for bits in self.source_bits[positions].tolist()]

    @property
    def sources(self) -> list[list[str]]:
        return [list(s) for s in self.sources_at(np.arange(len(self.items)))]


def merge(proposals: list[tuple[str, np.ndarray]], n_candidates: int) -> Candidates:
    """De-duplicate proposals in order (source by source, each best first), recording
    every source that proposed each item, and keep the first ``n_candidates`` items."""
    names = tuple(name for name, _ in proposals)
    if not proposals:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.uint32), names)
    items = np.concatenate([np.asarray(p, np.int64) for _, p in proposals])
    bit = np.repeat(np.left_shift(np.uint32(1), np.arange(len(proposals), dtype=np.uint32)),
                    [len(p) for _, p in proposals])
    if len(items) == 0:
        return Candidates(items, np.zeros(0, np.uint32), names)
    order = np.argsort(items, kind="stable")  # equal items stay in proposal order
    ordered = items[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    first = order[starts]  # each distinct item's first proposal
    bits = np.bitwise_or.reduceat(bit[order], starts)
    keep = np.argsort(first, kind="stable")[:n_candidates]  # in order of first proposal
    return Candidates(ordered[starts][keep], bits[keep], names)


def quotas(weights: dict[str, float], available: list[str], n_candidates: int) -> dict[str, int]:
    """Split ``n_candidates`` among the available sources in proportion to their
    weights (each available source gets at least one slot)."""
    total = sum(weights.get(name, 0.0) for name in available)
    if total <= 0:
        return {name: n_candidates // max(len(available), 1) for name in available}
    return {name: max(1, int(round(n_candidates * weights.get(name, 0.0) / total))) for name in available}
