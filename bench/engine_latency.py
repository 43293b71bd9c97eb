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
    result["live_events"] = live_user_latency(engine, modes, users, args)
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
    live = result["live_events"]
    print(
        f"Users with live events ({live['users']} users, {live['events_per_user']} events each), against table users:"
    )
    for name in modes:
        r = live[name]
        print(
            f"  {name:<7} p50 {r['live_p50_ms']:.3f} ms vs {r['table_p50_ms']:.3f} ms (ratio {r['p50_ratio']:.2f}, "
            f"target <= 2), p99 {r['live_p99_ms']:.3f} vs {r['table_p99_ms']:.3f} ms; "
            f"first request after an event (fold-in) p50 {r['first_p50_ms']:.3f} ms"
        )
    print(f"indexes: {result['indexes']} -> {out}")


def live_user_latency(engine: Engine, modes: dict, users: list, args, n_live: int = 500, events: int = 5) -> dict:
    """Recommend latency for users with events recorded live (served from their whole
    history: fold-in CF vector, searches instead of the per-user tables) beside users
    served from the tables, requests alternating, per ranking mode. The first request
    after a user's events pays their fold-in; the rest read it cached."""
    rng = np.random.default_rng(1)
    table_users = [u for u in dict.fromkeys(users)]
    live_users, table_users = table_users[:n_live], table_users[n_live:]
    items = engine.items.ids[rng.integers(0, len(engine.items), (len(live_users), events))]
    out: dict = {"users": len(live_users), "events_per_user": events}
    for name, mode in modes.items():
        engine.use_ranker(mode)
        engine.record(
            [
                {"user_id": u, "item_id": str(i), "kind": "click"}
                for u, row in zip(live_users, items)
                for i in row[: events - 1]
            ],
            persist=False,
        )
        engine.record(
            [{"user_id": u, "item_id": str(row[-1]), "kind": "view"} for u, row in zip(live_users, items)],
            persist=False,
        )
        first = np.empty(len(live_users))
        for j, u in enumerate(live_users):
            start = time.perf_counter()
            engine.recommend(u, k=10, n_candidates=args.n_candidates)
            first[j] = time.perf_counter() - start
        live_t, table_t = np.empty(args.requests), np.empty(args.requests)
        for r in range(args.requests):
            for who, times in ((live_users[r % len(live_users)], live_t), (table_users[r % len(table_users)], table_t)):
                start = time.perf_counter()
                engine.recommend(who, k=10, n_candidates=args.n_candidates)
                times[r] = time.perf_counter() - start
        out[name] = {
            "live_p50_ms": float(np.median(live_t) * 1e3),
            "live_p99_ms": float(np.percentile(live_t, 99) * 1e3),
            "table_p50_ms": float(np.median(table_t) * 1e3),
            "table_p99_ms": float(np.percentile(table_t, 99) * 1e3),
            "first_p50_ms": float(np.median(first) * 1e3),
            "p50_ratio": float(np.median(live_t) / np.median(table_t)),
        }
    return out


if __name__ == "__main__":
    main()
