"""The pipeline beside popularity, implicit ALS and EASE on synthetic data of several shapes.

Issue 18's yardstick for defaults that travel: datasets the defaults were not chosen on,
made by the generator in shapes unlike ML-100K, each evaluated by ``tandem
eval-pipeline``'s code (the pipeline as ``make train index`` publishes it, the peers at
the best of their grids, in the same run):

- ``explicit-1k``: 1-5 ratings, 2,000 users x 1,000 items, 100k ratings, side features;
- ``implicit-16k``: the likes (rating >= 4) of 8,000 users x 16,000 items, about 110k
  interactions all of value 1, a steep popularity law, side features;
- ``implicit-3k-bare``: the likes of 6,000 users x 3,000 items with even activity
  (short histories), no side features at all.

The generator's times carry no trend, so each shape is split per user at random (20%);
``--split folds`` scores five such splits (seeds 0-4) and reports the means, each
split's peers at their best on that split.
With ``--tune MINUTES``, ``tandem tune`` then fits the settings on each shape's training
part alone (its own validation carve-out, never the test part) within that budget, and
the pipeline trained with them is scored beside the same peers.
Usage: python bench/shapes.py [--shapes NAME ...] [--seed S] [--split random|folds] [--ease-max-items N]
[--tune MINUTES]
Writes bench/results/shapes.json and prints pipeline / best peer per shape and metric.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _results import save_result

from engine.config import load_config, merged
from engine.data import Dataset, make_synthetic
from index_builder.evaluate import evaluate_pipeline, format_summary, make_splits
from index_builder.tune import tune


def _likes_only(ds: Dataset, name: str, features: bool = True) -> Dataset:
    """The interactions rated 4 or 5, as implicit feedback (every value 1)."""
    keep = ds.ratings >= 4
    return Dataset(
        ds.user_idx[keep],
        ds.item_idx[keep],
        np.ones(int(keep.sum()), np.float32),
        ds.timestamps[keep],
        ds.users,
        ds.items,
        ds.user_features if features else None,
        ds.item_features if features else None,
        ds.item_titles,
        name=name,
        drop_duplicates=False,
    )


SHAPES = {
    "explicit-1k": lambda seed: make_synthetic(n_users=2_000, n_items=1_000, n_ratings=100_000, seed=seed),
    "implicit-16k": lambda seed: _likes_only(
        make_synthetic(n_users=8_000, n_items=16_000, n_ratings=240_000, popularity_exponent=1.1, seed=seed),
        "implicit-16k",
    ),
    "implicit-3k-bare": lambda seed: _likes_only(
        make_synthetic(n_users=6_000, n_items=3_000, n_ratings=150_000, activity_sigma=0.4, seed=seed),
        "implicit-3k-bare",
        features=False,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--seed", type=int, default=1, help="generator seed (the split's is 0)")
    parser.add_argument("--split", choices=("random", "folds"), default="random", help="one random split or five")
    parser.add_argument(
        "--ease-max-items", type=int, default=20_000, metavar="N", help="skip EASE when items and users both exceed N"
    )
    parser.add_argument("--tune", type=float, default=0.0, metavar="MINUTES", help="also tune on each training part")
    args = parser.parse_args()
    if args.tune and args.split != "random":
        parser.error("--tune tunes on one training part: use it with --split random")
    results = {}
    for name in args.shapes:
        ds = SHAPES[name](args.seed)
        print(f"{name}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_ratings:,} interactions", flush=True)
        start = time.perf_counter()
        splits = make_splits(ds, None, args.split)
        report = evaluate_pipeline(splits, ease_max_items=args.ease_max_items, data_name=name, ablation=False)
        results[name] = {
            "n_users": ds.n_users,
            "n_items": ds.n_items,
            "n_interactions": ds.n_ratings,
            "seconds": time.perf_counter() - start,
            "summary": report["summary"],
        }
        print(format_summary(report), flush=True)
        if args.tune > 0:
            results[name]["tuned"] = _tuned(splits, args.tune, name)
    save_result("shapes" if args.split == "random" else "shapes_folds", {"seed": args.seed, "shapes": results})
    print("\npipeline / best peer (Recall@10, NDCG@10):")
    for name, row in results.items():
        pipeline = row["summary"]["pipeline"]
        cells = [
            f"{pipeline[f'ratio_to_best_peer_{m}']:.3f} (pipeline {pipeline[m]:.4f}, "
            f"{pipeline[f'best_peer_{m}']} {row['summary'][pipeline[f'best_peer_{m}']][m]:.4f})"
            for m in ("recall@10", "ndcg@10")
        ]
        print(f"  {name:<18} " + "   ".join(cells))
        if "tuned" in row:
            tuned = row["tuned"]["pipeline"]
            ratios = [tuned[m] / row["summary"][pipeline[f"best_peer_{m}"]][m] for m in ("recall@10", "ndcg@10")]
            print(
                f"  {name + ' tuned':<18} {ratios[0]:.3f} (pipeline {tuned['recall@10']:.4f})   "
                f"{ratios[1]:.3f} (pipeline {tuned['ndcg@10']:.4f})"
            )


def _tuned(splits, minutes: float, name: str) -> dict:
    """``tandem tune`` on the training part (``minutes``), then the pipeline trained with
    the tuned settings, scored on the test part."""
    config = load_config()
    ((_, (train, _)),) = splits
    result = tune(train, config, budget_minutes=minutes, progress=False)
    print(f"{name}: tune kept trial {result['best_trial']} of {result['trials']}: {result['best']}", flush=True)
    report = evaluate_pipeline(
        splits, config=merged(config, result["best"], "tune"), peer_names=(), data_name=name, ablation=False
    )
    pipeline = report["summary"]["pipeline"]
    print(f"{name} tuned: Recall@10 {pipeline['recall@10']:.4f}, NDCG@10 {pipeline['ndcg@10']:.4f}", flush=True)
    return {"settings": result["best"], "trials": result["trials"], "pipeline": pipeline}


if __name__ == "__main__":
    main()
