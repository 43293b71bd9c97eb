"""Exact nearest-neighbour search in NumPy: the reference every other index is measured
against, and the search of models that rank every item (see
:mod:`engine.index.vector_index` for the conventions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.index.vector_index import as_queries, check_metric, unpack_bits
from engine.topk import top_k_rows

# Queries scored at once: the score block is at most this many floats (64 MiB).
BLOCK_FLOATS = 16 * 2**20


class ExactIndex:
    """Brute force over ``vectors [n, dim]``: every query scores every allowed item.

    The vectors are held as given (a read-only view when possible), not copied."""

    def __init__(self, vectors: np.ndarray, metric: str):
        self.metric = check_metric(metric)
        self.vectors = np.asarray(vectors, np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, dim], got shape {self.vectors.shape}")
        self._norms: np.ndarray | None = None  # squared norms, for l2, on first use

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.vectors)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, conditions=None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        n, k = len(queries), int(k)
        scores = np.full((n, k), -np.inf if self.metric == "ip" else np.inf, np.float32)
        labels = np.full((n, k), -1, np.int64)
        if k <= 0 or len(self) == 0:
            return scores, labels
        blocked = None if allowed is None else ~unpack_bits(allowed, len(self))
        norms = self._squared_norms() if self.metric == "l2" else np.zeros(0, np.float32)
        step = max(1, BLOCK_FLOATS // len(self))
        for start in range(0, n, step):
            block = queries[start : start + step]
            # "Higher is better" inside: inner products, or negated squared distances.
            if self.metric == "ip":
                better = block @ self.vectors.T
            else:
                better = 2 * (block @ self.vectors.T) - norms - np.einsum("ij,ij->i", block, block)[:, None]
            if blocked is not None:
                better[:, blocked] = -np.inf  # never returned
            top = top_k_rows(better, k)
            found = np.take_along_axis(better, np.maximum(top, 0), 1)
            labels[start : start + len(block)] = top
            scores[start : start + len(block)] = np.where(
                top >= 0, found if self.metric == "ip" else np.maximum(-found, 0), scores[start : start + len(block)]
            )
        return scores, labels

    def _squared_norms(self) -> np.ndarray:
        if self._norms is None:  # (two threads may both compute it: the same values)
            self._norms = np.einsum("ij,ij->i", self.vectors, self.vectors)
        return self._norms

    def added(self, vectors: np.ndarray) -> ExactIndex:
        return ExactIndex(np.concatenate([self.vectors, np.asarray(vectors, np.float32)]), self.metric)

    def save(self, path: str | Path) -> None:
        """One ``.npz`` file: the vectors and the metric (no pickle)."""
        with open(path, "wb") as f:
            np.savez(f, vectors=self.vectors, metric=np.array(self.metric))

    @classmethod
    def load(cls, path: str | Path) -> ExactIndex:
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["vectors"], str(saved["metric"]))
