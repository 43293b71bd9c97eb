"""Time and peak memory of the synthetic generator at ML-20M size (B6's data).

Usage: python bench/synthetic_scale.py [--n-ratings 20000000] [--repeats 1]
Writes bench/results/synthetic_scale.json and prints a summary.
"""

from __future__ import annotations

import argparse
import resource
import time

from _results import save_result

from engine.data import make_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=int, default=140_000)
    parser.add_argument("--n-items", type=int, default=27_000)
    parser.add_argument("--n-ratings", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    times = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        ds = make_synthetic(n_users=args.n_users, n_items=args.n_items, n_ratings=args.n_ratings, seed=seed)
        times.append(time.perf_counter() - start)
        del ds
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    times.sort()
    result = {
        "n_users": args.n_users,
        "n_items": args.n_items,
        "n_ratings": args.n_ratings,
        "seconds_median": times[len(times) // 2],
        "seconds_all": times,
        "ratings_per_second": args.n_ratings / times[len(times) // 2],
        "peak_rss_gb": peak_gb,
    }
    out = save_result("synthetic_scale", result)
    print(
        f"synthetic {args.n_ratings:,} ratings ({args.n_users:,} users x {args.n_items:,} items): "
        f"{result['seconds_median']:.1f} s median of {args.repeats}, "
        f"{result['ratings_per_second'] / 1e6:.2f} M ratings/s, peak RSS {peak_gb:.2f} GB  -> {out}"
    )


if __name__ == "__main__":
    main()
