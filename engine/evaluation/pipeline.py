"""Evaluation of a served two-stage pipeline on held-out data (protocol B2): for every
test user with relevant items (rated >= 4), each source's candidate recall@N (share of
the user's relevant items among that source's candidates), the merged candidates'
recall@N, the final Recall@10 / NDCG@10 of ``Engine.recommend``, and its latency. The
workflow that trains and publishes a bundle per fold and runs this beside the peers is
:mod:`index_builder.evaluate` (``tandem eval-pipeline``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from engine import data
from engine.evaluation import metrics
from engine.serving.engine import SOURCE_NAMES, Engine
from engine.serving.retrieval import Proposals, merge


def evaluate_engine(
    engine: Engine, test: data.Dataset, k: int = 10, n_candidates: int = 500, min_rating: float | str = "auto"
) -> dict:
    """Candidate recall per source and merged, final Recall/NDCG@k and latency on ``test``
    (whose id maps must be the engine's)."""
    relevant = metrics.relevant_matrix(test, min_rating)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    recall_sum = {name: 0.0 for name in (*SOURCE_NAMES, "merged")}
    counted = {name: 0 for name in recall_sum}
    recs = np.full((len(users), k), -1, np.int64)
    latencies = np.empty(len(users))
    for row, u in enumerate(users):
        user_id = test.users.ids[u]
        rel = set(relevant.indices[relevant.indptr[u] : relevant.indptr[u + 1]].tolist())
        proposals = engine.candidates(user_id, n_candidates)
        merged = merge([(name, Proposals.of_one(items)) for name, items in proposals.items()], n_candidates)
        for name, items in [*proposals.items(), ("merged", merged.items)]:
            recall_sum[name] += len(rel & set(items.tolist())) / len(rel)
            counted[name] += 1
        start = time.perf_counter()
        rec = engine.recommend(user_id, k=k, n_candidates=n_candidates)
        latencies[row] = time.perf_counter() - start
        recs[row, : len(rec)] = engine.items.indices(rec.item_ids)
    report: dict[str, Any] = dict(metrics.ranking_metrics(recs, relevant[users], k))
    report["candidate_recall"] = {name: recall_sum[name] / counted[name] for name in recall_sum if counted[name]}
    report["latency_ms"] = {
        "p50": float(np.percentile(latencies, 50) * 1e3),
        "p99": float(np.percentile(latencies, 99) * 1e3),
    }
    report["n_users"] = int(len(users))
    return report
