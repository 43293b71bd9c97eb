"""Evaluation of the whole two-stage pipeline on protocol B2 (``tandem eval-pipeline``).

For each fold: train CF (``wmse``, the implicit-feedback objective over all pairs) and
the towers (``softmax``) on the training part, build and load a bundle, then for every test user
with relevant items (rated >= 4): each source's candidate recall@N (share of the user's
relevant items among that source's candidates), the merged candidates' recall@N, the
final Recall@10 / NDCG@10 of ``Engine.recommend``, and its latency. Popularity and, when
installed, implicit ALS are measured on the same folds in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine import data
from engine.evaluation import metrics
from engine.evaluation.offline import implicit_als_metrics, popularity_recommender, topn_metrics
from engine.models.cf import PRESETS, train_cf
from engine.models.towers import train_two_tower
from engine.serving.engine import SOURCE_NAMES, Engine, EngineConfig
from engine.serving.retrieval import Proposals, merge

# CF for top-N on implicit data: the wmse objective (see engine.models.cf.PRESETS). The mse
# defaults serve rating error (B1).
CF_RETRIEVAL_SETTINGS = PRESETS["topn"]


def evaluate_engine(
    engine: Engine, test: data.Dataset, k: int = 10, n_candidates: int = 500, min_rating: float = 4.0
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


def evaluate_pipeline(
    directory: str | Path,
    folds=(1, 2, 3, 4, 5),
    k: int = 10,
    n_candidates: int = 500,
    engine_config: EngineConfig | None = None,
    log=print,
) -> dict:
    """Protocol B2 end to end on ML-100K folds; returns per-fold and mean figures."""
    from index_builder.build import build_bundle

    per_fold = []
    for fold in folds:
        log(f"fold u{fold}: training CF (wmse) and towers (softmax) ...")
        train, test = data.predefined_split(directory, fold)
        cf = train_cf(train, progress=False, **CF_RETRIEVAL_SETTINGS)
        towers = train_two_tower(train, objective="softmax", progress=False)
        with tempfile.TemporaryDirectory() as root:
            build_bundle(train, cf, towers, root, log=lambda line: None)
            engine = Engine.load(root, engine_config)
            row = {
                "fold": fold,
                "pipeline": evaluate_engine(engine, test, k, n_candidates),
                "popularity": topn_metrics(popularity_recommender(train), test, k=k),
            }
        try:
            als = implicit_als_metrics(train, test, k)
            row["implicit_als"] = als
        except ImportError:  # the bench extra is not installed: report without the peer
            als = None
        per_fold.append(row)
        log(
            f"  recall@{k}: pipeline {row['pipeline'][f'recall@{k}']:.4f}, "
            f"popularity {row['popularity'][f'recall@{k}']:.4f}"
            + (f", implicit ALS {als[f'recall@{k}']:.4f}" if als else "")
        )

    def mean(system: str, key: str) -> float | None:
        values = [r[system][key] for r in per_fold if system in r]
        return float(np.mean(values)) if values else None

    summary: dict[str, dict[str, Any]] = {}
    for system in ("pipeline", "popularity", "implicit_als"):
        if any(system in r for r in per_fold):
            summary[system] = {key: mean(system, key) for key in (f"recall@{k}", f"ndcg@{k}")}
    summary["pipeline"]["candidate_recall"] = {
        name: float(
            np.mean(
                [r["pipeline"]["candidate_recall"][name] for r in per_fold if name in r["pipeline"]["candidate_recall"]]
            )
        )
        for name in per_fold[0]["pipeline"]["candidate_recall"]
    }
    summary["pipeline"]["latency_ms"] = {
        q: float(np.mean([r["pipeline"]["latency_ms"][q] for r in per_fold])) for q in ("p50", "p99")
    }
    return {"folds": list(folds), "k": k, "n_candidates": n_candidates, "summary": summary, "per_fold": per_fold}


def format_summary(report: dict) -> str:
    k, s = report["k"], report["summary"]
    lines = [
        f"Pipeline evaluation (B2) on ML-100K folds {report['folds']}, {report['n_candidates']} candidates",
        f"  {'system':<14}{f'Recall@{k}':>11}{f'NDCG@{k}':>10}",
    ]
    for system in ("pipeline", "popularity", "implicit_als"):
        if system in s:
            lines.append(f"  {system:<14}{s[system][f'recall@{k}']:>11.4f}{s[system][f'ndcg@{k}']:>10.4f}")
    lines.append(
        f"  candidate recall@{report['n_candidates']} per source: "
        + ", ".join(f"{name} {value:.3f}" for name, value in s["pipeline"]["candidate_recall"].items())
    )
    lat = s["pipeline"]["latency_ms"]
    lines.append(f"  recommend latency: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
    target = s["pipeline"][f"recall@{k}"] >= 0.39
    lines.append(f"  target Recall@{k} >= 0.39: {'met' if target else 'NOT met'}")
    return "\n".join(lines)
