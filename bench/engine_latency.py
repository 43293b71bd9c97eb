"""Benchmark of the Engine in-process on a 100k-item synthetic catalogue.

Trains small CF and tower models quickly (latency does not depend on their quality),
publishes a bundle (HNSW indexes at this size), then measures ``recommend`` latency
(p50/p99 over single requests, 500 candidates, k = 10) and ``recommend_batch``
throughput (users/s). Targets: p50 <= 1 ms, p99 <= 5 ms, >= 2,000 users/s.

Usage: python bench/engine_latency.py [--n-items 100000] [--requests 2000]
Writes bench/results/engine.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
from _catalogue import build_catalogue_bundle
from _results import save_result

from engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--n-users", type=int, default=20_000)
    parser.add_argument("--n-ratings", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--n-candidates", type=int, default=500)
    parser.add_argument("--bundle", help="measure an existing bundle root instead of building one")
    args = parser.parse_args()
    if args.bundle:
        return measure(Engine.load(args.bundle), args)

    with tempfile.TemporaryDirectory() as root:
        build_catalogue_bundle(root, args.n_items, args.n_users, args.n_ratings)
        measure(Engine.load(root), args)


def measure(engine: Engine, args) -> None:
    manifest = engine.bundle.manifest
    rng = np.random.default_rng(0)
    users = list(engine.users.ids[rng.choice(len(engine.users), args.requests, replace=True)])
    for u in users[:100]:  # warm-up
        engine.recommend(u, k=10, n_candidates=args.n_candidates)
    times = np.empty(len(users))
    for r, u in enumerate(users):
        start = time.perf_counter()
        engine.recommend(u, k=10, n_candidates=args.n_candidates)
        times[r] = time.perf_counter() - start
    start = time.perf_counter()
    engine.recommend_batch(users, k=10, n_candidates=args.n_candidates)
    batch_s = time.perf_counter() - start
    result = {
        "n_items": len(engine.items),
        "n_users": len(engine.users),
        "n_candidates": args.n_candidates,
        "indexes": {k: v["factory"] + " " + json.dumps(v["search_params"]) for k, v in manifest.indexes.items()},
        "recommend_p50_ms": float(np.median(times) * 1e3),
        "recommend_p99_ms": float(np.percentile(times, 99) * 1e3),
        "batch_users_per_s": len(users) / batch_s,
    }
    out = save_result("engine", result)
    print(
        f"Engine on {len(engine.items):,} items, {args.n_candidates} candidates, k=10: recommend p50 "
        f"{result['recommend_p50_ms']:.2f} ms (target <= 1), p99 {result['recommend_p99_ms']:.2f} ms "
        f"(target <= 5); recommend_batch {result['batch_users_per_s']:,.0f} users/s (target >= 2,000)"
    )
    print(f"indexes: {result['indexes']} -> {out}")


if __name__ == "__main__":
    main()
