"""How a batch of prepared requests becomes merged candidates: one interface, two
implementations, chosen by ``engine.pipeline`` (:class:`~engine.settings.EngineConfig`).

- ``"batch"`` (:class:`BatchPipeline`): every source proposes for all users in a few
  array operations and :func:`~engine.serving.retrieval.merge` de-duplicates them. Any
  number of users; the reference the other is tested against.
- ``"compiled"`` (:class:`CompiledPipeline`, the default): the same for batches, but a
  lone request — most of a service's traffic — runs the table sources and the merge as
  two loops compiled with numba (:mod:`engine.serving.lone_merge`), some 30 NumPy calls
  fewer. Tests check that both give the same candidates, sources and counts.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.serving.lone_merge import LoneMerge
from engine.serving.retrieval import Candidates, Requests, merge
from engine.settings import PIPELINES


class CandidatePipeline(Protocol):
    def candidates(
        self, sources: dict, requests: Requests, shares: dict[str, np.ndarray], n_candidates: int, n_items: int
    ) -> tuple[Candidates, list[dict[str, int]]]:
        """The merged candidates of ``requests`` (each source's quota per user in
        ``shares``, in merge order) and, per user, how many items each source available
        to them proposed (for monitoring)."""
        ...


class BatchPipeline:
    """Sources, then merge, in array operations over the whole batch."""

    def candidates(
        self, sources: dict, requests: Requests, shares: dict[str, np.ndarray], n_candidates: int, n_items: int
    ) -> tuple[Candidates, list[dict[str, int]]]:
        proposals = [(name, sources[name].propose(requests, quota)) for name, quota in shares.items()]
        per_user = {name: found.counts(len(requests)).tolist() for name, found in proposals}
        active = {name: (quota > 0).tolist() for name, quota in shares.items()}
        proposed = [{name: c[u] for name, c in per_user.items() if active[name][u]} for u in range(len(requests))]
        return merge(proposals, n_candidates), proposed


class CompiledPipeline:
    """Lone requests through the compiled merge, batches through :class:`BatchPipeline`.
    The kernels are compiled (or loaded from numba's cache) when the pipeline is made,
    not in a request."""

    def __init__(self, sources: dict, n_items: int):
        self._lone = LoneMerge()
        self._lone.warm_up(sources, n_items)
        self._batch = BatchPipeline()

    def candidates(
        self, sources: dict, requests: Requests, shares: dict[str, np.ndarray], n_candidates: int, n_items: int
    ) -> tuple[Candidates, list[dict[str, int]]]:
        if len(requests) != 1:
            return self._batch.candidates(sources, requests, shares, n_candidates, n_items)
        quota = {name: int(q[0]) for name, q in shares.items()}
        candidates, counts = self._lone.candidates(sources, requests, quota, n_candidates, n_items)
        return candidates, [counts]


def make_pipeline(name: str, sources: dict, n_items: int) -> CandidatePipeline:
    """The pipeline ``engine.pipeline`` names."""
    if name == "compiled":
        return CompiledPipeline(sources, n_items)
    if name == "batch":
        return BatchPipeline()
    raise ValueError(f"engine.pipeline must be one of {PIPELINES}, got {name!r}")
