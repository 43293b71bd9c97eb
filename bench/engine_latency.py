"""Benchmark of the Engine in-process on a 100k-item synthetic catalogue.

Trains small CF and tower models quickly (latency does not depend on their quality),
publishes a bundle (HNSW indexes at this size), then measures ``recommend`` latency
(p50/p99 over single requests, 500 candidates, k = 10) and ``recommend_batch``
throughput (users/s), with the learned ranker (of the largest size the default settings
allow) and with the blend alone, in the same run. Targets with the ranker: p50 <= 0.3 ms,
p99 <= 1 ms.

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
    """Latency and throughput with the bundle's ranker (when it has one) and with the
    blend alone, in the same run: requests alternate between the two, so that both
    meet the same machine load."""
    manifest = engine.bundle.manifest
    rng = np.random.default_rng(0)
    users = list(engine.users.ids[rng.choice(len(engine.users), args.requests, replace=True)])
    ranker = engine.ranker
    modes = {"ranker": ranker, "blend": None} if ranker is not None else {"blend": None}
    for mode in modes.values():  # warm-up
        engine.use_ranker(mode)
        for u in users[:100]:
            engine.recommend(u, k=10, n_candidates=args.n_candidates)
    times = {name: np.empty(len(users)) for name in modes}
    for r, u in enumerate(users):
        for name, mode in modes.items():
            engine.use_ranker(mode)
            start = time.perf_counter()
            engine.recommend(u, k=10, n_candidates=args.n_candidates)
            times[name][r] = time.perf_counter() - start
    result = {
        "n_items": len(engine.items),
        "n_users": len(engine.users),
        "n_candidates": args.n_candidates,
        "indexes": {k: v["factory"] + " " + json.dumps(v["search_params"]) for k, v in manifest.indexes.items()},
    }
    if ranker is not None:
        result["ranker_model"] = {"trees": ranker.metrics.get("num_trees"), "depth": ranker.depth}
    for name, mode in modes.items():
        engine.use_ranker(mode)
        start = time.perf_counter()
        engine.recommend_batch(users, k=10, n_candidates=args.n_candidates)
        batch_s = time.perf_counter() - start
        result[name] = {
            "recommend_p50_ms": float(np.median(times[name]) * 1e3),
            "recommend_p99_ms": float(np.percentile(times[name], 99) * 1e3),
            "batch_users_per_s": len(users) / batch_s,
        }
    engine.use_ranker(ranker)
    out = save_result("engine", result)
    print(f"Engine on {len(engine.items):,} items, {args.n_candidates} candidates, k=10:")
    for name in modes:
        r = result[name]
        print(
            f"  {name:<7} recommend p50 {r['recommend_p50_ms']:.3f} ms, p99 {r['recommend_p99_ms']:.3f} ms; "
            f"recommend_batch {r['batch_users_per_s']:,.0f} users/s"
        )
    if ranker is not None:
        print(
            f"  ranker: {result['ranker_model']['trees']} trees re-scoring the blend's best {ranker.depth} candidates"
        )
    print(f"indexes: {result['indexes']} -> {out}")


if __name__ == "__main__":
    main()
