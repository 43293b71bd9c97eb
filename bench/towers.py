"""Benchmark for the two-tower model: B1, B2 and B3 with baselines in the same run, and
single-request inference latency.

- B1: the ``mse`` variant's RMSE/MAE on ML-100K u1..u5.
- B2: the ``softmax`` variant's Recall@10 / NDCG@10 beside popularity (target: >= 30%
  above popularity).
- B3: cold-start items — 20% of the items held out with all their ratings (seed 0); for
  each user with relevant held-out items, rank only the held-out items, from features
  alone; beside random order, genre-popularity and feature-popularity (target: NDCG@10
  >= 1.5x genre-popularity).
- Latency: one user-tower forward pass, NumPy on exported weights vs torch (median and
  p99 over repeats; target p50 <= 0.2 ms).

Usage: python bench/towers.py [--data DIR] [--folds 1 2 3 4 5]
Writes bench/results/towers.json and prints a summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _results import save_result

from engine import data
from engine.config import resolve_data_source
from engine.evaluation import metrics
from engine.evaluation.offline import popularity_recommender, rating_metrics, topn_metrics
from engine.models.towers import train_two_tower


def b1_b2(directory: Path, folds: list[int]) -> dict:
    rows: dict[str, list[dict]] = {"towers mse": [], "towers softmax": [], "popularity": []}
    for fold in folds:
        print(f"  B1/B2 fold u{fold} ...", flush=True)
        train, test = data.predefined_split(directory, fold)
        seen = train.user_items()
        start = time.perf_counter()
        mse = train_two_tower(train, objective="mse", progress=False)
        fit = time.perf_counter() - start
        rows["towers mse"].append({"fit_s": fit, **rating_metrics(mse.predict_rating_indices, test)})
        start = time.perf_counter()
        soft = train_two_tower(train, objective="softmax", progress=False)
        fit = time.perf_counter() - start
        rows["towers softmax"].append(
            {"fit_s": fit, **topn_metrics(lambda u, k: soft.recommend_indices(u, k, seen), test, k=10)}
        )
        rows["popularity"].append(topn_metrics(popularity_recommender(train), test, k=10))
    return {
        name: {key: float(np.mean([r[key] for r in rs])) for key in rs[0] if key != "n_users_evaluated"}
        for name, rs in rows.items()
    }


def b3(directory: Path, seed: int = 0) -> dict:
    full = data.load(directory)
    split = data.item_cold_start_split(full, 0.2, seed=seed)
    train, test, cold = split.train, split.test, split.cold_items
    relevant = metrics.relevant_matrix(test, 4.0)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    rel = sp.csr_matrix(relevant[users][:, cold])  # relevance among the cold items only

    def evaluate(score_matrix: np.ndarray) -> dict:
        top = np.argsort(-score_matrix, axis=1, kind="stable")[:, :10]
        return {"recall@10": metrics.recall_at_k(top, rel, 10), "ndcg@10": metrics.ndcg_at_k(top, rel, 10)}

    genres = full.item_features.columns["genres"].astype(np.float64)
    counts = train.item_counts().astype(np.float64)
    warm = np.setdiff1d(np.arange(full.n_items), cold)
    results = {}
    rng = np.random.default_rng(seed)
    results["random order"] = evaluate(rng.random((len(users), len(cold))))
    # genre-popularity: an item scores the mean, over its genres, of the genre's mean train popularity
    genre_pop = (genres[warm] * counts[warm, None]).sum(0) / np.maximum(genres[warm].sum(0), 1)
    item_genre_pop = (genres @ genre_pop) / np.maximum(genres.sum(1), 1)
    results["genre-popularity"] = evaluate(np.tile(item_genre_pop[cold], (len(users), 1)))
    # feature-popularity: least squares of log popularity on genres + release-decade bins
    year = full.item_features.columns["year"]
    decade = np.where(np.isfinite(year), np.clip((np.nan_to_num(year) - 1920) // 10, 0, 8), 9).astype(int)
    design = np.hstack([genres, np.eye(10)[decade], np.ones((full.n_items, 1))])
    coef, *_ = np.linalg.lstsq(design[warm], np.log1p(counts[warm]), rcond=None)
    results["feature-popularity"] = evaluate(np.tile((design @ coef)[cold], (len(users), 1)))
    for objective in ("softmax", "mse"):
        model = train_two_tower(train, objective=objective, progress=False, seed=seed)
        results[f"towers {objective}"] = evaluate(model.user_vectors_at(users) @ model.item_vectors[cold].T)
    return {"n_users": int(len(users)), "n_cold_items": int(len(cold)), "systems": results}


def latency(directory: Path, repeats: int = 2000) -> dict:
    import torch

    train, _ = data.predefined_split(directory, 1)
    model = train_two_tower(train, objective="mse", epochs=2, progress=False)
    x = model.user_features([train.users.ids[0]])
    user_net = model.torch_towers[0]
    xt = torch.as_tensor(x)

    def torch_forward():
        with torch.inference_mode():
            torch.nn.functional.normalize(user_net(xt), dim=1)

    def features_and_forward():
        model.user_embeddings([train.users.ids[0]])

    out = {}
    for name, fn in (
        ("numpy forward", lambda: model.user_tower(x)),
        ("torch forward", torch_forward),
        ("numpy features+forward", features_and_forward),
    ):
        for _ in range(100):
            fn()
        times = np.empty(repeats)
        for r in range(repeats):
            start = time.perf_counter()
            fn()
            times[r] = time.perf_counter() - start
        out[name] = {"p50_ms": float(np.median(times) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ML-100K directory (default: auto)")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    directory = Path(resolve_data_source(args.data or "auto"))
    if not (directory / "u1.base").is_file():
        raise SystemExit(f"ML-100K not found at {directory}: pass --data or set TANDEM_ML100K")

    print("B1/B2 ...", flush=True)
    quality = b1_b2(directory, args.folds)
    print("B3 ...", flush=True)
    cold = b3(directory)
    print("latency ...", flush=True)
    lat = latency(directory)
    result = {"folds": args.folds, "b1_b2": quality, "b3": cold, "latency": lat}
    out = save_result("towers", result)

    pop, soft, mse = quality["popularity"], quality["towers softmax"], quality["towers mse"]
    print(
        f"\nB1 (ML-100K folds {args.folds}): towers mse RMSE {mse['rmse']:.4f}, MAE {mse['mae']:.4f}, "
        f"fit {mse['fit_s']:.1f} s/fold"
    )
    print(
        f"B2: towers softmax Recall@10 {soft['recall@10']:.4f} NDCG@10 {soft['ndcg@10']:.4f} "
        f"(fit {soft['fit_s']:.1f} s/fold) vs popularity {pop['recall@10']:.4f} / {pop['ndcg@10']:.4f}: "
        f"x{soft['recall@10'] / pop['recall@10']:.2f} / x{soft['ndcg@10'] / pop['ndcg@10']:.2f} "
        f"(target x1.30)"
    )
    base = cold["systems"]["genre-popularity"]["ndcg@10"]
    print(f"B3 cold items ({cold['n_cold_items']} items, {cold['n_users']} users):")
    print(f"  {'system':<22}{'Recall@10':>10}{'NDCG@10':>9}{'NDCG vs genre-pop':>19}")
    for name, r in cold["systems"].items():
        print(f"  {name:<22}{r['recall@10']:>10.4f}{r['ndcg@10']:>9.4f}{r['ndcg@10'] / base:>18.2f}x")
    print("  (target: towers NDCG@10 >= 1.5x genre-popularity)")
    print("Latency of one user-tower forward pass (single request):")
    for name, r in lat.items():
        print(f"  {name:<24} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
