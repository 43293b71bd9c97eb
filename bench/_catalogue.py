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
    milvus=None,
) -> Path:
    """Train quick models on ``make_synthetic(...)`` and publish a bundle under ``root``
    (``user_top_k``: the per-user top-items tables' width, default as ``make index``;
    0 builds none, so that known users' requests search the indexes; ``milvus``: a
    :class:`~engine.index.milvus_index.MilvusTarget` to build the indexes in)."""
    from engine import data
    from engine.models.cf import train_cf
    from engine.models.towers import train_two_tower
    from index_builder import build_bundle
    from index_builder.build import USER_TOP_ITEMS

    ds = data.make_synthetic(n_users=n_users, n_items=n_items, n_ratings=n_ratings, seed=0)
    print(f"training quick models on {ds} ...", flush=True)
    # (The mission's plain MF: with history factors, these two epochs' vectors gave an
    # HNSW inner-product recall@10 of 0.93, below the publishing floor, and were refused.)
    cf = train_cf(
        ds, n_features=32, epochs=2, batch_size=65_536, learning_rate=0.01, history_factors=False, progress=False
    )
    towers = train_two_tower(ds, objective="softmax", epochs=1, batch_size=4096, progress=False)
    print("building the bundle ...", flush=True)
    return build_bundle(
        ds,
        cf,
        towers,
        root,
        n_queries=300,
        user_top_k=USER_TOP_ITEMS if user_top_k is None else user_top_k,
        ranker=full_size_ranker(ds, cf, towers),
        milvus=milvus,
    )


def full_size_ranker(ds, cf, towers):
    """A learned ranker of the largest size the default ``[ranker]`` settings allow
    (``num_trees`` trees of ``num_leaves`` leaves, no early stopping), fitted on random
    rows with this bundle's feature names: its cost per candidate is what a trained
    ranker's is at most, whatever it learned. The data is explicit, so it has a rating
    model, as ``make train``'s would: the quick CF (mse, history factors) stands in."""
    import numpy as np

    from engine.data.attributes import ItemAttributes
    from engine.models.ranker import Ranker
    from engine.serving.features import feature_groups
    from engine.settings import RankerConfig

    groups = feature_groups((towers.name, cf.name), ItemAttributes.of_features(ds.item_features), rating=True)
    rng = np.random.default_rng(0)
    config = RankerConfig(min_data_in_leaf=20)
    per_user, n_users = config.depth, 2000
    features = rng.normal(size=(per_user * n_users, len(groups))).astype(np.float32)
    labels = (features[:, 0] + rng.normal(size=len(features)) > 1.5).astype(np.int32)
    sizes = np.full(n_users, per_user)
    return Ranker.fit(features, labels, sizes, list(groups), groups, config, rating=cf)
