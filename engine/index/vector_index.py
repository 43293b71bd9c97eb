"""The one interface of nearest-neighbour search over item vectors.

Every search in Tandem — retrieval sources, "more like this", the index builder's
per-user tables, recall checks — goes through a :class:`VectorIndex`. Two backends
implement it today: :class:`~engine.index.exact.ExactIndex` (NumPy brute force: the
reference) and :class:`~engine.index.faiss_index.FaissIndex` (Flat, HNSW, IVF, IVF-PQ);
a distributed vector database is one more class. One contract test suite
(``tests/test_vector_index.py``) runs over every implementation.

Conventions, shared by every backend:

- **labels** are dense item indices ``0..n-1``, in the order vectors were added (an
  item appended to the catalogue takes the next label); ``-1`` pads a row when fewer
  than ``k`` items qualify;
- **scores** depend on the metric: ``"ip"`` gives inner products (higher is better),
  ``"l2"`` gives *squared distances* (lower is better). Rows are best first, ties by
  the lower label;
- **filter**: ``allowed`` is a packed little-endian bitmap of the items a search may
  return (bit ``i`` of byte ``i // 8`` set = item ``i`` allowed; :func:`pack_mask`), or
  ``None`` for every item. Filtering happens *inside* the search, so a full ``k`` comes
  back whenever ``k`` allowed items exist (approximate backends: as far as their graph
  or lists reach);
- **conditions**: a search may also be told the attribute filters ``allowed`` includes
  (:class:`Conditions`): a backend that stores the items' attributes (Milvus) searches
  with them natively; the others ignore them. ``allowed`` stays the whole truth;
- **immutability**: :meth:`VectorIndex.added` returns a new index with more vectors and
  leaves the original as it was, so readers of the original never see a half-added item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

METRICS = ("ip", "l2")


@dataclass(frozen=True)
class Conditions:
    """The attribute filters of a request (:mod:`engine.data.attributes`) and the mask of
    the items they allow: the part of a search's ``allowed`` bitmap a backend with the
    attributes can express natively (the rest — seen items, block and allow lists — it
    reads from the bitmap)."""

    filters: Mapping
    mask: np.ndarray  # [n_items] bool


@runtime_checkable
class VectorIndex(Protocol):
    """Nearest-neighbour search over item vectors (see the module's conventions)."""

    metric: str  # "ip" (inner product, higher is better) or "l2" (squared distance, lower is better)

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        ...

    def __len__(self) -> int:
        """How many vectors the index holds (labels ``0..len - 1``)."""
        ...

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, conditions: Conditions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n, k] float32, labels [n, k] int64)`` of the ``k`` best allowed items
        for each of ``queries [n, dim]``, best first, ``-1`` labels padding."""
        ...

    def added(self, vectors: np.ndarray) -> VectorIndex:
        """A new index holding this one's vectors and then ``vectors [m, dim]`` (labels
        ``len .. len + m - 1``); this index is unchanged."""
        ...

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` (no pickle)."""
        ...


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    return metric


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """The packed little-endian bitmap of a boolean item mask (the ``allowed`` filter)."""
    return np.packbits(np.asarray(mask, bool), bitorder="little")


def unpack_bits(bits: np.ndarray, n: int) -> np.ndarray:
    """The boolean mask ``[n]`` of a packed little-endian bitmap."""
    return np.unpackbits(bits, count=n, bitorder="little").astype(bool)


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a C-contiguous float32 ``[n, dim]`` array, checked."""
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [n, {dim}], got shape {queries.shape}")
    return queries
