"""FAISS indexes over item vectors: :class:`FaissIndex` (the :class:`VectorIndex` of
FAISS), and choosing, building, tuning against exact search, saving and loading.

Labels are dense item indices ``0..n-1`` (the order of the bundle's item ids), so a new
item appended to the catalogue takes the next label without an id map. Every approximate
index keeps its exact twin as the reference: :func:`measure_recall` compares the two on a
sample of queries, and :func:`build_index` tunes ``efSearch`` (HNSW) or ``nprobe`` (IVF)
until recall@k reaches the floor.

Metrics: ``"l2"`` (squared Euclidean distance, ascending — "more like this") and
``"ip"`` (inner product, descending — retrieval scores). Recall is tie-aware: a result
as close as the exact k-th neighbour counts, since identical vectors (the zero vectors of
items without ratings) make the exact id list itself arbitrary.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.errors import TandemError
from engine.index.exact import ExactIndex
from engine.index.vector_index import as_queries, check_metric
from engine.settings import IndexConfig

EXACT_BELOW = IndexConfig.exact_below  # items: exact search is fast enough below this
FLOAT_MEMORY_LIMIT = 8 * 1024**3  # bytes of float vectors above which HNSW gives way to IVF-PQ


@dataclass
class IndexReport:
    """What was built and how well it does (written to the bundle's manifest)."""

    factory: str
    metric: str
    n_vectors: int
    dim: int
    build_seconds: float
    recall_at_k: float
    k: int
    n_queries: int
    search_params: dict

    def to_json(self) -> dict:
        return asdict(self)


def _faiss():
    import faiss

    return faiss


def _metric(metric: str) -> int:
    faiss = _faiss()
    return faiss.METRIC_L2 if check_metric(metric) == "l2" else faiss.METRIC_INNER_PRODUCT


class IndexBuildError(TandemError, ValueError):
    """An index that cannot be built as asked (a bad factory string, too few vectors to
    train it)."""


class _Selectors(threading.local):
    """Per thread, the FAISS search parameters last built for a few filter bitmaps.
    Building a selector and parameters costs more than a lone request's bitmap: a thread
    that reuses one bitmap buffer request after request (engine.serving.retrieval) reuses
    them too. Each entry holds its bitmap, so the memory FAISS points to stays alive."""

    def __init__(self):
        self.entries: dict = {}  # (tuned parameters, id(bits)) -> (bits, params, selector)


_SELECTORS = _Selectors()
_SELECTORS_KEPT = 8


class FaissIndex:
    """A FAISS index with the search parameters tuned when it was built (``efSearch``
    for HNSW, ``nprobe`` for IVF): a :class:`~engine.index.vector_index.VectorIndex`.

    The ``allowed`` filter is handed to FAISS as an ``IDSelectorBitmap`` over the packed
    bitmap itself (no copy), so filtering happens inside the search."""

    def __init__(self, index, metric: str, search_params: dict | None = None):
        self.index, self.metric = index, check_metric(metric)
        self.search_params = dict(search_params or {})

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, conditions=None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        scores, labels = self.index.search(queries, int(k), params=self._params(allowed))
        return scores, labels

    def _params(self, allowed: np.ndarray | None):
        key = (tuple(sorted(self.search_params.items())), None if allowed is None else id(allowed))
        entry = _SELECTORS.entries.get(key)
        if entry is not None and entry[0] is allowed:
            return entry[1]
        faiss = _faiss()
        given = {}
        if allowed is not None:
            if len(allowed) * 8 < len(self):
                raise ValueError(f"the filter bitmap covers {len(allowed) * 8} items; the index holds {len(self)}")
            # (FAISS's n is the bitmap's length in bytes: an id beyond it is not selected.)
            given["sel"] = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(allowed))
        tuned = self.search_params
        if "efSearch" in tuned:
            params = faiss.SearchParametersHNSW(efSearch=int(tuned["efSearch"]), **given)
        elif "nprobe" in tuned:
            params = faiss.SearchParametersIVF(nprobe=int(tuned["nprobe"]), **given)
        else:
            params = faiss.SearchParameters(**given)
        if len(_SELECTORS.entries) >= _SELECTORS_KEPT:
            _SELECTORS.entries.pop(next(iter(_SELECTORS.entries)))
        _SELECTORS.entries[key] = (allowed, params, given.get("sel"))  # FAISS keeps raw pointers to both
        return params

    def added(self, vectors: np.ndarray) -> FaissIndex:
        """A copy of this index with ``vectors`` added (FAISS adds in place, so the copy
        keeps this index unchanged for the requests that read it)."""
        copy = _faiss().clone_index(self.index)
        copy.add(as_queries(vectors, self.dim))
        return FaissIndex(copy, self.metric, self.search_params)

    def save(self, path: str | Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, metric: str, search_params: dict | None = None) -> FaissIndex:
        """Read an index written by :meth:`save`, with its tuned search parameters."""
        return cls(_faiss().read_index(str(path)), metric, search_params)


def choose_factory(
    n_vectors: int, dim: int, exact_below: int = EXACT_BELOW, float_memory_limit: int = FLOAT_MEMORY_LIMIT
) -> str:
    """A FAISS factory string for a catalogue: exact ``Flat`` below ``exact_below`` items,
    ``HNSW32`` while the float vectors fit in ``float_memory_limit`` bytes, else IVF-PQ
    (codes of ``dim / 2`` bytes instead of ``4 dim``)."""
    if n_vectors < exact_below:
        return "Flat"
    if n_vectors * dim * 4 <= float_memory_limit:
        return "HNSW32"
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n_vectors))))
    m = next(m for m in (dim // 2, dim // 4, dim // 8, 1) if m >= 1 and dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def set_search_params(index, params: dict) -> None:
    """Apply ``{"efSearch": n}`` or ``{"nprobe": n}`` to a raw FAISS index (the defaults
    of searches without explicit parameters)."""
    faiss = _faiss()
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def tie_aware_recall(
    approx_scores: np.ndarray, approx_labels: np.ndarray, exact_scores: np.ndarray, metric: str, rtol: float = 1e-5
) -> float:
    """recall@k where a returned item counts when it is as close as the exact k-th
    neighbour: items tied at the cut-off (identical vectors, e.g. the zero vectors of
    items without ratings) are equally right answers. ``[n, k]`` arrays; label -1 never
    counts."""
    kth = exact_scores[:, -1:]
    tol = rtol * np.maximum(np.abs(kth), 1.0)
    good = approx_scores <= kth + tol if metric == "l2" else approx_scores >= kth - tol
    return float((good & (approx_labels >= 0)).sum(1).mean() / exact_scores.shape[1])


def measure_recall(index, vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> float:
    """recall@k of a :class:`VectorIndex` against exact search over ``vectors`` on
    ``queries`` (tie-aware, see :func:`tie_aware_recall`)."""
    k = min(k, len(vectors))
    exact_scores, _ = ExactIndex(vectors, metric).search(queries, k)
    scores, labels = index.search(queries, k)
    return tie_aware_recall(scores, labels, exact_scores, metric)


def build_index(
    vectors: np.ndarray,
    metric: str,
    factory: str | None = None,
    queries: np.ndarray | None = None,
    k: int = 10,
    recall_floor: float = 0.95,
    n_queries: int = 1000,
    seed: int = 0,
):
    """Build an index over ``vectors`` ``[n, dim]`` and measure its recall@k.

    Args:
        metric: ``"l2"`` or ``"ip"``.
        factory: a FAISS factory string; ``None`` chooses by size (:func:`choose_factory`).
        queries: the query sample for the recall check (default: ``n_queries`` of the
            vectors themselves, seeded).
        recall_floor: HNSW's ``efSearch`` / IVF's ``nprobe`` are raised until recall@k
            reaches it (or their maximum); the caller decides whether to publish.

    Returns ``(FaissIndex, IndexReport)``.
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty [n, dim] array, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    n, dim = vectors.shape
    factory = factory or choose_factory(n, dim)
    rng = np.random.default_rng(seed)
    if queries is None:
        queries = vectors[rng.choice(n, min(n_queries, n), replace=False)]
    queries = np.ascontiguousarray(queries, np.float32)
    start = time.perf_counter()
    try:
        index = faiss.index_factory(dim, factory, _metric(metric))
    except RuntimeError as e:
        raise IndexBuildError(
            f"invalid FAISS factory string {factory!r} (e.g. Flat, HNSW32, IVF1024,PQ16): "
            f"{str(e).splitlines()[-1].rsplit(': ', 1)[-1]}"
        ) from None
    try:
        if not index.is_trained:
            train = vectors if n <= 200_000 else vectors[rng.choice(n, 200_000, replace=False)]
            index.train(train)
        index.add(vectors)
    except RuntimeError as e:  # e.g. fewer training points than clusters
        raise IndexBuildError(
            f"FAISS could not build {factory!r} on {n} vectors of dim {dim}: "
            f"{str(e).splitlines()[-1].rsplit('Error: ', 1)[-1]}"
        ) from None
    build_seconds = time.perf_counter() - start

    kk = min(k, n)
    exact_scores, _ = ExactIndex(vectors, metric).search(queries, kk)
    params: dict = {}

    def recall() -> float:
        # Scores are recomputed exactly for the returned labels: PQ codes give
        # approximate distances, which must not pass for exact ones.
        _, labels = index.search(queries, kk)
        return tie_aware_recall(_exact_scores(vectors, queries, labels, metric), labels, exact_scores, metric)

    measured = recall()
    if "HNSW" in factory:
        ef = 16
        while True:
            params = {"efSearch": ef}
            set_search_params(index, params)
            measured = recall()
            if measured >= recall_floor or ef >= 1024:
                break
            ef *= 2
    elif "IVF" in factory:
        nlist = faiss.extract_index_ivf(index).nlist
        nprobe = 1
        while True:
            params = {"nprobe": nprobe}
            set_search_params(index, params)
            measured = recall()
            if measured >= recall_floor or nprobe >= nlist:
                break
            nprobe = min(nprobe * 2, nlist)
    report = IndexReport(factory, metric, n, dim, build_seconds, float(measured), kk, len(queries), params)
    return FaissIndex(index, metric, params), report


def _exact_scores(vectors: np.ndarray, queries: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances (l2) or inner products (ip) of queries to the labelled vectors."""
    picked = vectors[np.maximum(labels, 0)]  # [n, k, dim]
    if metric == "l2":
        return ((picked - queries[:, None, :]) ** 2).sum(-1)
    return np.einsum("nkd,nd->nk", picked, queries)
