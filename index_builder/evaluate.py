"""``tandem eval-pipeline``: protocol B2 on the whole two-stage pipeline.

For each fold: train CF (``wmse``, the implicit-feedback objective over all pairs) and
the towers (``softmax``) on the training part, build and load a bundle, and evaluate it
(:func:`engine.evaluation.pipeline.evaluate_engine`). Popularity and, when installed,
implicit ALS are measured on the same folds in the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engine import data
from engine.evaluation.offline import implicit_als_metrics, popularity_recommender, topn_metrics
from engine.evaluation.pipeline import evaluate_engine
from engine.serving.engine import Engine, EngineConfig
from index_builder.train import train_and_publish


def evaluate_pipeline(
    directory: str | Path,
    folds=(1, 2, 3, 4, 5),
    k: int = 10,
    n_candidates: int = 500,
    engine_config: EngineConfig | None = None,
    config: dict[str, Any] | None = None,
    log=print,
) -> dict:
    """Protocol B2 end to end on ML-100K folds; returns per-fold and mean figures. Each
    fold's bundle is what ``make train index`` would publish from its training part
    (:func:`~index_builder.train.train_and_publish`, with ``config``)."""

    per_fold = []
    for fold in folds:
        log(f"fold u{fold}: training CF (wmse) and towers (softmax) ...")
        train, test = data.predefined_split(directory, fold)
        with tempfile.TemporaryDirectory() as root:
            train_and_publish(train, root, config, log=lambda line: None)
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
