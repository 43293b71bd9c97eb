"""Benchmark B6 for CF: training throughput and peak memory on synthetic 20M ratings.

One epoch of minibatch Adam over ML-20M-sized synthetic data (~140k users, ~27k items).
Reports ratings/s of the epoch itself and over the whole ``train_cf`` call (setup
included), and the peak RSS of the process (the generator's data included). Targets: >= 1M ratings/s,
<= 3 GB. Large batches are the throughput setting: the default batch of 1024 is tuned
for ML-100K accuracy, not for speed.

Usage: python bench/cf_scale.py [--n-ratings 20000000] [--batch-size 262144] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import time

from _results import save_result

from engine.data import make_synthetic
from engine.models.cf import train_cf


def add_b6_flags(parser: argparse.ArgumentParser) -> None:
    """B6's data and batch: ML-20M-sized synthetic ratings, one large-batch epoch (also
    bench/cf_dist.py's)."""
    parser.add_argument("--n-users", type=int, default=140_000)
    parser.add_argument("--n-items", type=int, default=27_000)
    parser.add_argument("--n-ratings", type=int, default=20_000_000)
    parser.add_argument("--batch-size", type=int, default=262_144)
    parser.add_argument("--n-features", type=int, default=32)


def b6_data(args: argparse.Namespace):
    return make_synthetic(n_users=args.n_users, n_items=args.n_items, n_ratings=args.n_ratings, seed=0)


def b6_epoch(ds, args: argparse.Namespace, device: str = "cpu", progress: bool = False):
    """One epoch of minibatch Adam on ``ds`` with B6's settings: ``(model, seconds of the
    whole train_cf call)``. B6 measures the mission's model, without history factors."""
    start = time.perf_counter()
    model = train_cf(
        ds,
        epochs=1,
        batch_size=args.batch_size,
        n_features=args.n_features,
        validation_fraction=0.0,
        learning_rate=0.01,
        history_factors=False,
        device=device,
        progress=progress,
    )
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_b6_flags(parser)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    start = time.perf_counter()
    ds = b6_data(args)
    gen_s = time.perf_counter() - start
    rss_after_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    model, train_s = b6_epoch(ds, args, args.device, progress=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {
        "n_ratings": ds.n_ratings,
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "batch_size": args.batch_size,
        "n_features": args.n_features,
        "device": args.device,
        "generate_s": gen_s,
        "train_cf_call_s": train_s,
        "ratings_per_s_whole_call": ds.n_ratings / train_s,
        "ratings_per_s_epoch": model.metrics["ratings_per_second"],
        "peak_rss_gb": peak,
        "peak_rss_after_generation_gb": rss_after_data,
        "train_loss": model.metrics,
    }
    out = save_result("cf_scale", result)
    print(
        f"B6 CF: {ds.n_ratings:,} ratings, one epoch at {result['ratings_per_s_epoch'] / 1e6:.2f} M ratings/s "
        f"(target >= 1.0; {result['ratings_per_s_whole_call'] / 1e6:.2f} M/s over the whole train_cf call "
        f"of {train_s:.1f} s, setup included); peak RSS {peak:.2f} GB "
        f"(target <= 3.0; {rss_after_data:.2f} GB after generating the data) -> {out}"
    )


if __name__ == "__main__":
    main()
