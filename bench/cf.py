"""Benchmark B1 + B2 for collaborative filtering, with peers measured in the same run.

B1 (rating prediction): ML-100K u1..u5, Tandem CF with default settings (history
factors on) and the mission's plain MF (history factors off) beside scikit-surprise SVD
and SVD++ (defaults): RMSE, MAE, fit seconds per fold.
B2 (top-N): the ``bce`` variant's Recall@10 / NDCG@10 beside popularity and implicit
ALS (32 factors, regularisation 10) on the same folds.

Usage: python bench/cf.py [--data DIR] [--folds 1 2 3 4 5] [--no-peers]
Peers come from the ``bench`` extra (pip install -e ".[bench]"); missing ones are
reported as skipped. Writes bench/results/cf.json and prints a summary table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _results import save_result

from engine import data
from engine.config import resolve_data_source
from engine.evaluation.offline import popularity_recommender, rating_metrics, topn_metrics
from engine.evaluation.peers import implicit_als
from engine.models.cf import CFConfig, train_cf

# The bce variant's settings for implicit top-N (B2); the mse defaults serve B1.
BCE_SETTINGS = {"loss": "bce", "learning_rate": 0.005, "lambda_": 5.0, "batch_size": 4096}


def run_tandem(split, settings: dict) -> dict:
    start = time.perf_counter()
    model = train_cf(split.train, CFConfig(**{**settings, "progress": False}))
    fit = time.perf_counter() - start
    result = {"fit_s": fit, "best_epoch": model.metrics["best_epoch"]}
    if model.config.loss == "mse":
        result.update(rating_metrics(model.predict_indices, split.test, clip=(1, 5)))
    result.update(topn_metrics(lambda u, k: model.recommend_indices(u, k), split.test, k=10))
    return result


def run_surprise(directory: Path, fold: int, algo_name: str) -> dict:
    import surprise

    reader = surprise.Reader("ml-100k")
    ds = surprise.Dataset.load_from_folds(
        [(str(directory / f"u{fold}.base"), str(directory / f"u{fold}.test"))], reader=reader
    )
    trainset, testset = next(surprise.model_selection.PredefinedKFold().split(ds))
    algo = {"SVD": surprise.SVD, "SVD++": surprise.SVDpp}[algo_name](random_state=0)
    start = time.perf_counter()
    algo.fit(trainset)
    fit = time.perf_counter() - start
    preds = algo.test(testset)
    truth = np.array([p.r_ui for p in preds])
    est = np.clip(np.array([p.est for p in preds]), 1, 5)
    return {
        "fit_s": fit,
        "rmse": float(np.sqrt(np.mean((truth - est) ** 2))),
        "mae": float(np.mean(np.abs(truth - est))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ML-100K directory (default: auto)")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--no-peers", action="store_true", help="skip surprise and implicit")
    args = parser.parse_args()
    directory = Path(resolve_data_source(args.data or "auto"))
    if not (directory / "u1.base").is_file():
        raise SystemExit(f"ML-100K folds not found at {directory}: pass --data or set TANDEM_ML100K")

    systems: dict[str, list[dict]] = {}

    def record(name: str, fn) -> None:
        try:
            systems.setdefault(name, []).append(fn())
        except ImportError as e:
            systems[name] = [{"skipped": f"not installed: {e.name}"}]

    for fold in args.folds:
        split = data.predefined_split(directory, fold)
        print(f"fold u{fold} ...", flush=True)
        record("tandem CF (mse, defaults)", lambda: run_tandem(split, {}))
        record("tandem CF (mse, plain MF)", lambda: run_tandem(split, {"history_factors": False}))
        record("tandem CF (bce)", lambda: run_tandem(split, BCE_SETTINGS))
        record("popularity", lambda: topn_metrics(popularity_recommender(split.train), split.test, k=10))
        if not args.no_peers:
            if "skipped" not in systems.get("surprise SVD", [{}])[0]:
                record("surprise SVD", lambda: run_surprise(directory, fold, "SVD"))
            if "skipped" not in systems.get("surprise SVD++", [{}])[0]:
                record("surprise SVD++", lambda: run_surprise(directory, fold, "SVD++"))
            if "skipped" not in systems.get("implicit ALS", [{}])[0]:
                record(
                    "implicit ALS",
                    lambda: implicit_als(split.train, split.test, 10, factors=(32,), regularization=(10.0,)),
                )

    def mean(rows: list[dict], key: str):
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    summary = {
        name: (
            {"skipped": rows[0]["skipped"]}
            if "skipped" in rows[0]
            else {key: mean(rows, key) for key in ("rmse", "mae", "fit_s", "recall@10", "ndcg@10")}
        )
        for name, rows in systems.items()
    }
    ref_fit = summary.get("tandem CF (mse, defaults)", {}).get("fit_s")
    out = save_result(
        "cf", {"folds": args.folds, "summary": summary, "per_fold": systems, "bce_settings": BCE_SETTINGS}
    )

    def fmt(v, spec=".4f"):
        return "—" if v is None else format(v, spec)

    print(f"\nB1/B2 on ML-100K folds {args.folds} (means; fit ratio = system fit s / Tandem mse fit s)")
    print(f"{'system':<28}{'RMSE':>8}{'MAE':>8}{'fit s':>8}{'fit ratio':>10}{'Recall@10':>11}{'NDCG@10':>9}")
    for name, s in summary.items():
        if "skipped" in s:
            print(f"{name:<28}  skipped ({s['skipped']})")
            continue
        ratio = s["fit_s"] / ref_fit if s.get("fit_s") and ref_fit else None
        print(
            f"{name:<28}{fmt(s['rmse']):>8}{fmt(s['mae']):>8}{fmt(s['fit_s'], '.2f'):>8}"
            f"{fmt(ratio, '.2f'):>10}{fmt(s['recall@10']):>11}{fmt(s['ndcg@10']):>9}"
        )
    tandem = summary.get("tandem CF (mse, defaults)", {})
    if tandem.get("rmse") is not None:
        verdict = "meets" if tandem["rmse"] <= 0.905 and tandem["fit_s"] <= 4.0 else "MISSES"
        print(
            f"\nTandem mean RMSE {tandem['rmse']:.4f} at {tandem['fit_s']:.2f} s/fold {verdict} "
            f"the B1 target (<= 0.905 at <= 4 s/fold). -> {out}"
        )


if __name__ == "__main__":
    main()
