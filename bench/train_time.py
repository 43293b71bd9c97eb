"""`make train index` wall time, beside implicit ALS's fit on the same interactions.

Issue 18's training-time targets: ML-100K within 15 s, and a 100k-interaction implicit
dataset with about 17k items within 30 s. Each dataset runs as a user runs it: ``tandem
train`` then ``tandem build-index``, two processes (imports included), into a temporary
models and bundles directory. The implicit set is the likes (rating >= 4) of a synthetic
8,000 users x 25,000 items (about 110k interactions on 16.9k distinct items), written as a
CSV of user, item and timestamp. implicit's ALS
(64 factors, 15 iterations, the peer of ``tandem eval-pipeline``) is fitted on the same
interactions in this process.

Usage: python bench/train_time.py [--repeats 3] [--data DIR_OR_CSV ...]
Writes bench/results/train_time.json and prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _results import save_result

from engine import data
from engine.config import resolve_data_source

TANDEM = [sys.executable, "-m", "engine"]


def implicit_csv(directory: Path) -> Path:
    """The likes of a synthetic 8,000 users x 25,000 items, as user,item,timestamp rows:
    about 110k interactions with 16.9k distinct items."""
    ds = data.make_synthetic(n_users=8_000, n_items=25_000, n_ratings=135_000, popularity_exponent=0.9, seed=7)
    keep = ds.ratings >= 4
    path = directory / "implicit-17k.csv"
    pd.DataFrame(
        {
            "user": ds.users.external(ds.user_idx[keep]),
            "item": ds.items.external(ds.item_idx[keep]),
            "timestamp": ds.timestamps[keep],
        }
    ).to_csv(path, index=False)
    return path


def time_train_index(source: str, work: Path) -> dict:
    models, bundles = work / "models", work / "bundles"
    settings = ["--set", f"paths.models={models}", "--set", f"paths.bundles={bundles}"]
    seconds = {}
    for command in ("train", "build-index"):
        extra = ["--no-progress"] if command == "train" else []
        start = time.perf_counter()
        subprocess.run([*TANDEM, *settings, command, "--data", source, *extra], check=True, capture_output=True)
        seconds[command] = time.perf_counter() - start
    seconds["train + index"] = seconds["train"] + seconds["build-index"]
    return seconds


def time_implicit_als(ds: data.Dataset) -> float | None:
    try:
        from implicit.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    matrix = ds.user_items().copy()
    matrix.data[:] = 1.0
    with threadpool_limits(1, "blas"):
        start = time.perf_counter()
        AlternatingLeastSquares(factors=64, iterations=15, random_state=0).fit(matrix, show_progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", nargs="*", help="datasets (default: ML-100K when present, and the implicit set)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = args.data
        if not sources:
            sources = [str(implicit_csv(work))]
            ml100k = resolve_data_source("auto")
            if ml100k != "synthetic":
                sources.insert(0, ml100k)
        for source in sources:
            ds = data.load(source)
            print(f"{source}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_ratings:,} interactions", flush=True)
            runs = [time_train_index(source, work) for _ in range(args.repeats)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            als = time_implicit_als(ds)
            results[Path(source).name] = {
                "n_users": ds.n_users,
                "n_items": ds.n_items,
                "n_interactions": ds.n_ratings,
                "runs": runs,
                "median_s": median,
                "implicit_als_fit_s": als,
            }
            every = ", ".join(f"{run['train + index']:.1f}" for run in runs)
            print(
                f"  train {median['train']:.1f} s + build-index {median['build-index']:.1f} s = "
                f"{median['train + index']:.1f} s (median of {args.repeats}; all: {every});"
                f" implicit ALS fit {'skipped' if als is None else f'{als:.2f} s'}",
                flush=True,
            )
    save_result("train_time", results)


if __name__ == "__main__":
    main()
