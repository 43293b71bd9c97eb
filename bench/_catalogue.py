"""The synthetic catalogue the serving benchmarks measure (bench-engine, bench-serve):
quick CF and tower models on a synthetic dataset, published as a bundle. Latency does not
depend on the models' quality, so they train for seconds, not minutes."""

from __future__ import annotations

from pathlib import Path


def build_catalogue_bundle(
    root: str | Path,
    n_items: int = 100_000,
    n_users: int = 20_000,
    n_ratings: int = 1_000_000,
    user_top_k: int | None = None,
) -> Path:
    """Train quick models on ``make_synthetic(...)`` and publish a bundle under ``root``
    (``user_top_k``: the per-user top-items tables' width, default as ``make index``;
    0 builds none, so that known users' requests search the indexes)."""
    from engine import data
    from engine.models.cf import train_cf
    from engine.models.towers import train_two_tower
    from index_builder import build_bundle
    from index_builder.build import USER_TOP_ITEMS

    ds = data.make_synthetic(n_users=n_users, n_items=n_items, n_ratings=n_ratings, seed=0)
    print(f"training quick models on {ds} ...", flush=True)
    cf = train_cf(ds, n_features=32, epochs=2, batch_size=65_536, learning_rate=0.01, progress=False)
    towers = train_two_tower(ds, objective="softmax", epochs=1, batch_size=4096, progress=False)
    print("building the bundle ...", flush=True)
    return build_bundle(
        ds, cf, towers, root, n_queries=300, user_top_k=USER_TOP_ITEMS if user_top_k is None else user_top_k
    )
