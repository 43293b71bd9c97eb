"""The learned ranking stage: its features against hand computations, its training and
storage in the bundle, serving (lone, batch and score agree), explanations in the
library and over gRPC, the blend fallback, and the ablation of eval-pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine import Engine, EngineConfig, data
from engine.config import load_config
from engine.errors import TandemError
from engine.index.bundle import BundleError
from engine.models.ranker import Ranker
from engine.service.client import Client
from engine.service.server import ServerConfig, TandemServer
from engine.serving.features import base_feature_groups
from engine.settings import RankerConfig
from index_builder.build import item_cooccurrence
from index_builder.evaluate import evaluate_pipeline
from index_builder.ranker import fit_ranker, ranker_examples
from index_builder.train import train_and_publish

FAST = [
    "cf.epochs=2",
    "retrieval.cf.als_iterations=4",
    "towers.epochs=1",
    "retrieval.towers.epochs=1",
    "ranker.num_trees=20",
    "ranker.depth=30",
    "ranker.n_candidates=100",
    "engine.segment_key=occupation",
]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A synthetic dataset (with timestamps, genres and user segments) published by
    train_and_publish with its learned ranker."""
    ds = data.make_synthetic(n_users=300, n_items=200, n_ratings=9000, seed=1)
    config = load_config(None, FAST)
    root = tmp_path_factory.mktemp("ranked")
    train_and_publish(ds, root, config, log=lambda line: None)
    return ds, root, config, Engine.load(root, EngineConfig(segment_key="occupation"))


def test_the_bundle_holds_a_checksummed_ranker_that_the_engine_serves(ranked):
    ds, root, _, engine = ranked
    manifest = json.loads((root / "current" / "manifest.json").read_text())
    assert {"ranker/ranker.txt", "ranker/ranker.json", "ranker/rating/cf.json"} <= set(manifest["files"])
    assert manifest["models"]["ranker"]["num_trees"] >= 1
    assert engine.ranker is not None and engine.ranker.feature_names == engine.features.names
    assert Engine.load(root, EngineConfig(ranking="blend")).ranker is None


def test_features_equal_their_definitions(ranked):
    ds, _, _, engine = ranked
    user = ds.users.ids[5]
    u = ds.users.index(user)
    cat = engine._catalogue
    requests = engine.user_context.requests(cat, [user], True, cat.every_item)
    candidates, _ = engine._candidates(cat, requests, 100, None)
    at = np.arange(40)
    blend = engine._blend(cat, requests, candidates.rows[at], candidates.items[at])
    features = engine.features.of_candidates(requests, candidates, at, blend, cat)
    column = {name: features[:, j] for j, name in enumerate(engine.features.names)}
    items = candidates.items[at]

    for name, model in (("cf", engine.cf), ("towers", engine.towers)):
        raw = model.retrieval_user_vectors(np.array([u]))[0] @ model.retrieval_item_vectors()[items].T
        raw = raw + model.user_biases(np.array([u]))[0]
        scale = engine.blend.scales[name]
        np.testing.assert_allclose(column[f"{name}_score"], (raw - scale.mean) / scale.std, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(column["blend_score"], blend)
    sources = candidates.sources_at(at)
    for source in ("cf", "towers", "popular", "segment", "recent"):
        np.testing.assert_array_equal(column[f"from_{source}"], [source in s for s in sources])
    np.testing.assert_array_equal(column["n_sources"], [len(s) for s in sources])
    np.testing.assert_array_equal(column["candidate_position"], at)
    np.testing.assert_allclose(column["item_popularity"], np.log1p(ds.item_counts()[items]), rtol=1e-6)
    seen = ds.user_items()[u].indices
    np.testing.assert_allclose(column["user_activity"], np.log1p(len(seen)), rtol=1e-6)
    liked, ratings = ds.liked(), ds.ratings
    for name, values, mine in (
        ("item_like_rate", liked, None),
        ("item_mean_rating", ratings, None),
        ("user_like_rate", liked, ds.user_idx == u),
    ):
        prior = values.mean()
        if mine is None:  # per item: (sum + 10 x the global value) / (count + 10)
            expected = [(values[ds.item_idx == i].sum() + 10 * prior) / ((ds.item_idx == i).sum() + 10) for i in items]
        else:
            expected = (values[mine].sum() + 10 * prior) / (mine.sum() + 10)
        np.testing.assert_allclose(column[name], expected, rtol=1e-5)

    genres = np.asarray(ds.item_features.columns["genres"]) != 0
    profile = genres[seen].sum(axis=0)
    expected = [profile[genres[i]].sum() / max(genres[i].sum(), 1) / len(seen) for i in items]
    np.testing.assert_allclose(column["affinity:genres"], expected, rtol=1e-5)

    neighbours = engine.features.tables.cooccurring
    similarity = engine.features.tables.cooccurrence
    expected = [similarity[i][np.isin(neighbours[i], seen) & (neighbours[i] >= 0)].sum() for i in items]
    np.testing.assert_allclose(column["cooccurrence_sum"], expected, rtol=1e-5)
    np.testing.assert_allclose(column["cooccurrence_mean"], np.array(expected) / len(seen), rtol=1e-5)

    ease_from, ease_weight = engine.features.tables.ease_from, engine.features.tables.ease_weight
    expected = [ease_weight[i][np.isin(ease_from[i], seen) & (ease_from[i] >= 0)].sum() for i in items]
    np.testing.assert_allclose(column["ease_score"], expected, rtol=1e-5, atol=1e-7)

    # The ranker's rating model (explicit data): its predicted rating, clipped.
    rating = engine.ranker.rating
    assert rating is not None and rating.config.loss == "mse" and rating.history_vectors is not None
    expected = np.clip(rating.predict_indices(np.full(len(items), u), items), *rating.rating_range)
    np.testing.assert_allclose(column["rating_prediction"], expected, rtol=1e-5)

    liked = engine.user_context.recent[u]
    liked = liked[liked >= 0]
    X = engine.cf.X / np.linalg.norm(engine.cf.X, axis=1, keepdims=True)
    cosines = X[items] @ X[liked].T
    np.testing.assert_allclose(column["recent_similarity_max"], cosines.max(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(column["recent_similarity_mean"], cosines.mean(axis=1), rtol=1e-5, atol=1e-6)
    # The ranking stage reads each model's standardised score off the blend's terms: the same values.
    at_blend, served = engine._first_phase(cat, requests, candidates, 40)
    direct = engine.features.of_candidates(requests, candidates, at_blend, served[:, 0] * np.nan, cat)
    for name in ("cf_score", "towers_score"):
        j = engine.features.names.index(name)
        np.testing.assert_allclose(served[:, j], direct[:, j], rtol=1e-4, atol=1e-5)
    base = base_feature_groups(tuple(engine.user_context.models), rating=True)
    assert engine.features.names[: len(base)] == list(base)


def test_cooccurrence_keeps_each_items_most_similar_by_cosine():
    ds = data.make_synthetic(n_users=80, n_items=50, n_ratings=900, seed=2)
    dense = ds.user_items().toarray() > 0
    shared = dense.T.astype(float) @ dense
    norms = np.sqrt(np.diag(shared))
    cosine = shared / np.outer(np.maximum(norms, 1), np.maximum(norms, 1))
    np.fill_diagonal(cosine, 0)
    neighbours, similarities = item_cooccurrence(ds, k=5)
    for i in range(ds.n_items):
        np.testing.assert_allclose(similarities[i], np.sort(cosine[i])[::-1][:5], rtol=1e-5, atol=1e-7)
        found = neighbours[i][neighbours[i] >= 0]
        np.testing.assert_allclose(cosine[i, found], similarities[i][: len(found)], rtol=1e-5)


def test_ease_weights_keep_the_largest_weights_into_each_item():
    from engine.evaluation.peers import _binary, ease_weights
    from index_builder.build import EASE_LAMBDA_PER_INTERACTION, item_ease_weights

    ds = data.make_synthetic(n_users=80, n_items=50, n_ratings=900, seed=2)
    B = ease_weights(_binary(ds), EASE_LAMBDA_PER_INTERACTION * ds.n_ratings / ds.n_items)
    sources, weights = item_ease_weights(ds, k=6)
    for i in range(ds.n_items):
        np.testing.assert_allclose(weights[i], B[sources[i], i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.abs(weights[i]), np.sort(np.abs(B[:, i]))[::-1][:6], rtol=1e-4, atol=1e-6)
    assert len(item_ease_weights(ds, max_items=40)[0]) == 0  # too many items: no table, the feature missing


def test_lone_batch_and_score_agree_under_the_ranker(ranked):
    ds, _, _, engine = ranked
    users = list(ds.users.ids[:12])
    batch = engine.recommend_batch(users, k=8)
    for user, together in zip(users, batch):
        alone = engine.recommend(user, k=8)
        np.testing.assert_array_equal(alone.item_ids, together.item_ids)
        np.testing.assert_array_equal(alone.scores, together.scores)
        scored = engine.score(user, list(alone.item_ids))
        by_item = dict(zip(scored.item_ids.tolist(), scored.scores.tolist()))
        np.testing.assert_allclose([by_item[i] for i in alone.item_ids.tolist()], alone.scores, rtol=1e-5)
    # The ranker changes the order the blend gives (it is not a no-op).
    blend_only = Engine.load(engine.bundle.path, EngineConfig(segment_key="occupation", ranking="blend"))
    differs = [
        not np.array_equal(engine.recommend(u, k=8).item_ids, blend_only.recommend(u, k=8).item_ids) for u in users
    ]
    assert any(differs)


def test_new_and_cold_users_are_ranked_with_missing_features(ranked):
    ds, _, _, engine = ranked
    cold = engine.recommend("nobody-at-all", k=5)
    assert len(cold) == 5 and cold.served_by == "popularity" and np.isfinite(cold.scores).all()
    folded = engine.recommend(ratings={ds.items.ids[0]: 5.0, ds.items.ids[1]: 4.0}, k=5)
    assert len(folded) == 5 and folded.served_by == "fold-in"
    assert not {ds.items.ids[0], ds.items.ids[1]} & set(folded.item_ids.tolist())
    # The rating model knows neither: their rating_prediction is missing (which the trees
    # learned from the examples whose rating was left out), a known user's is not.
    cat = engine._catalogue
    column = engine.features.names.index("rating_prediction")
    for users, missing in ((["nobody-at-all"], True), ([ds.users.ids[2]], False)):
        requests = engine.user_context.requests(cat, users, True, cat.every_item)
        candidates, _ = engine._candidates(cat, requests, 50, None)
        _, _, features = engine._rank(cat, requests, candidates, 5, engine.ranker)
        values = features[:, column]
        assert np.isnan(values).all() if missing else np.isfinite(values).all()


def test_implicit_data_trains_no_rating_model():
    from index_builder.ranker import rating_model

    ds = data.make_synthetic(n_users=50, n_items=30, n_ratings=600, seed=3)
    implicit = data.Dataset(
        ds.user_idx, ds.item_idx, np.ones(ds.n_ratings, np.float32), ds.timestamps, ds.users, ds.items
    )
    config = load_config(None, FAST)
    assert implicit.implicit and rating_model(implicit, config, RankerConfig()) is None
    assert rating_model(ds, config, RankerConfig(rating_model=False)) is None


def test_items_added_live_are_ranked_with_their_missing_features(ranked, tmp_path):
    ds, root, _, _ = ranked
    engine = Engine.load(root, EngineConfig(segment_key="occupation"))
    genres = engine.genre_labels[:2]
    engine.add_items(["live-1", "live-2"], [{"genres": genres}, {"genres": genres[:1]}], persist=False)
    user = ds.users.ids[4]
    scored = engine.score(user, ["live-1", ds.items.ids[0]])
    assert np.isfinite(scored.scores).all() and set(scored.item_ids) == {"live-1", ds.items.ids[0]}
    recs = engine.recommend(
        user, k=engine.features.names.__len__(), include_items=["live-1", "live-2", ds.items.ids[1]]
    )
    assert {"live-1", "live-2"} <= set(recs.item_ids.tolist()) and np.isfinite(recs.scores).all()


def test_items_added_live_borrow_their_content_neighbours_evidence(ranked):
    """A new item's neighbours are its 10 nearest bundle items by item-tower cosine, each
    bundle item embedded from its content alone (history zeroed, as a new item is), weighted
    by inverse cosine distance; its CF vector, popularity score and item-side ranker
    features are their weighted means (NaNs left out), each checked by hand here. A clone
    (the same content) finds the original at distance 0 and takes nearly all its weight."""
    from engine.serving.features import BORROWED
    from engine.serving.live_items import CONTENT_EPSILON

    ds, root, _, _ = ranked
    engine = Engine.load(root, EngineConfig(segment_key="occupation"))
    popular = int(np.argmax(ds.item_counts()))
    genres = ds.item_features.columns["genres"][popular].tolist()
    engine.add_items(["clone"], [{"genres": genres, "year": float(ds.item_features.columns["year"][popular])}], False)
    cat = engine._catalogue
    new = cat.items.index("clone")
    content = engine.towers.content_item_vectors()[: cat.n_bundle]
    sims = content @ cat.item_vectors[engine.towers.name][new]
    near = np.argsort(-sims, kind="stable")[:10]
    weights = 1 / (np.maximum(1 - sims[near].astype(np.float64), 0) + CONTENT_EPSILON)
    weights /= weights.sum()
    assert set(cat.borrowed_from[0].tolist()) == set(near.tolist()) and popular in near
    order = np.argsort(cat.borrowed_from[0])
    np.testing.assert_allclose(cat.borrowed_weights[0][order], weights[np.argsort(near)], rtol=1e-4)
    assert cat.borrowed_weights[0][cat.borrowed_from[0] == popular][0] > 0.5  # the original, at distance ~0
    np.testing.assert_allclose(cat.popularity_score[new], weights @ cat.popularity_score[near], rtol=1e-4)
    cf = cat.item_vectors[engine.cf.name]
    np.testing.assert_allclose(cf[new], weights @ cf[near], rtol=1e-4, atol=1e-6)
    user = ds.users.ids[4]
    requests = engine.user_context.requests(cat, [user], True, cat.every_item)

    def features(items):
        n = len(items)
        zeros = np.zeros(n)
        rows = np.zeros(n, np.int64)
        return engine.features.compute(
            requests, rows, np.asarray(items), zeros.astype(np.uint32), (), zeros, zeros.astype(np.float32), cat
        )

    mine, theirs = features([new]), features(near)
    for name in (name for name in BORROWED if name in engine.features.names):
        column = engine.features.names.index(name)
        values = theirs[:, column].astype(np.float64)
        known = ~np.isnan(values)
        want = (weights[known] @ values[known]) / weights[known].sum() if known.any() else np.nan
        np.testing.assert_allclose(mine[0, column], want, rtol=1e-4, atol=1e-6, err_msg=name)
    # CF scores the borrowed vector: the neighbours' scores, weighted (the score is linear).
    column = engine.features.names.index("cf_score")
    np.testing.assert_allclose(mine[0, column], weights @ theirs[:, column], rtol=1e-4, atol=1e-5)
    assert engine.recommend(user, k=10, include_items=["clone", *ds.items.ids[:30]]).scores.size == 10


def test_explanations_are_the_largest_contributions(ranked):
    ds, _, _, engine = ranked
    user = ds.users.ids[3]
    recs = engine.recommend(user, k=5, explain=True)
    assert len(recs.explanations) == 5
    cat = engine._catalogue
    requests = engine.user_context.requests(cat, [user], True, cat.every_item)
    candidates, _ = engine._candidates(cat, requests, 500, None)
    at, scores, features = engine._rank(cat, requests, candidates, 5, engine.ranker)
    contributions = engine.ranker.contributions(features)
    for item, explained in zip(recs.item_ids.tolist(), recs.explanations):
        row = int(np.flatnonzero(cat.items.external(candidates.items[at]) == item)[0])
        expected = np.sort(np.abs(contributions[row]))[::-1][:3]
        np.testing.assert_allclose([abs(e["contribution"]) for e in explained], expected, rtol=1e-5)
        assert {e["feature"] for e in explained} <= set(engine.features.names)
    assert recs.explanations and engine.recommend(user, k=5).explanations == []

    # The blend's explanation: its terms add up to the blend's score.
    blend_only = Engine.load(engine.bundle.path, EngineConfig(segment_key="occupation", ranking="blend"))
    recs = blend_only.recommend(user, k=5, explain=True)
    names = [f"{m}_score" for m in ("cf", "towers")] + ["item_popularity"]
    for score, explained in zip(recs.scores, recs.explanations):
        assert {e["feature"] for e in explained} == set(names)
        assert sum(e["contribution"] for e in explained) == pytest.approx(float(score), abs=1e-5)


def test_grpc_returns_the_librarys_explanations(ranked):
    ds, root, _, engine = ranked
    server = TandemServer(root, ServerConfig(port=0), EngineConfig(segment_key="occupation")).start()
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            remote = client.recommend(ds.users.ids[2], k=4, explain=True)
            plain = client.recommend(ds.users.ids[2], k=4)
            info = client.info()
    finally:
        server.stop(0)
    local = engine.recommend(ds.users.ids[2], k=4, explain=True)
    np.testing.assert_array_equal(remote.item_ids, local.item_ids)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-6)
    assert [[e["feature"] for e in x] for x in remote.explanations] == [
        [e["feature"] for e in x] for x in local.explanations
    ]
    np.testing.assert_allclose(
        [e["contribution"] for x in remote.explanations for e in x],
        [e["contribution"] for x in local.explanations for e in x],
        rtol=1e-5,
    )
    assert plain.explanations == []
    assert info["ranking"] == "ranker" and info["ranker_features"] == engine.features.names
    assert info["ranker_trees"] == engine.ranker.trees.n_trees and info["ranker_depth"] == engine.ranker.depth


def test_a_saved_ranker_loads_without_pickle_and_tampering_is_caught(ranked, tmp_path):
    ds, root, _, engine = ranked
    saved = engine.ranker.save(tmp_path / "ranker")
    again = Ranker.load(saved)
    rows = np.random.default_rng(0).normal(size=(20, len(engine.features.names))).astype(np.float32)
    np.testing.assert_array_equal(again.predict(rows), engine.ranker.predict(rows))
    np.testing.assert_array_equal(again.rating.W, engine.ranker.rating.W)  # its rating model too
    # Saved over by a ranker without one (implicit data), the old rating model goes.
    names = ["x" if name == "rating_prediction" else name for name in again.feature_names]
    plain = Ranker(again.booster, names, {}, 10, {})
    assert not (plain.save(tmp_path / "ranker") / "rating").exists()
    again.save(tmp_path / "ranker")
    shutil.rmtree(tmp_path / "ranker" / "rating")
    with pytest.raises(TandemError, match="rating model"):
        Ranker.load(tmp_path / "ranker")
    saved = again.save(tmp_path / "ranker")
    (saved / "ranker.txt").write_text("not a model")
    with pytest.raises(TandemError, match="not a LightGBM model"):
        Ranker.load(saved)
    with pytest.raises(ValueError, match="features"):
        names = [f"x{j}" for j in range(len(again.feature_names))]
        engine.use_ranker(Ranker(again.booster, names, {}, 10, {}))
    model = root / "current" / "ranker" / "ranker.txt"
    original = model.read_bytes()
    try:
        model.write_bytes(original.replace(b"Tree=0", b"Tree=9"))
        with pytest.raises(BundleError, match="ranker"):
            Engine.load(root)
    finally:
        model.write_bytes(original)


def test_the_ranker_learns_from_held_out_interactions(ranked):
    """On the examples it is trained on, a fitted ranker orders held-out relevant items
    above the others better than the blend score alone does (a generous margin)."""
    ds, _, config, _ = ranked

    ranker_config = RankerConfig.from_dict({**config["ranker"], "holdout": "random", "num_trees": 40})
    examples = ranker_examples(ds, config, ranker_config, log=lambda line: None)
    assert examples.labels.sum() > 0 and len(examples.group_sizes) > 20
    ranker = fit_ranker(examples, ranker_config, log=lambda line: None)
    blend = examples.features[:, examples.feature_names.index("blend_score")]

    def mean_auc(scores):
        aucs, start = [], 0
        for size in examples.group_sizes:
            s, y = scores[start : start + size], examples.labels[start : start + size]
            start += size
            pos, neg = s[y > 0], s[y == 0]
            if len(pos) and len(neg):
                aucs.append((pos[:, None] > neg[None, :]).mean())
        return float(np.mean(aucs))

    assert mean_auc(ranker.predict(examples.features)) > mean_auc(blend) + 0.01
    dropped = examples.without(["scores"])
    assert np.isnan(dropped.features[:, examples.feature_names.index("cf_score")]).all()
    assert not np.isnan(dropped.features[:, examples.feature_names.index("item_popularity")]).all()


def test_eval_pipeline_reports_the_ablation(ranked):
    ds, _, config, _ = ranked
    split = data.random_split(ds, 0.2, seed=0, per_user=True)
    report = evaluate_pipeline(
        [("random0", split)], k=5, n_candidates=100, config=config, peer_names=(), log=lambda x: None
    )
    ablation = report["summary"]["pipeline"]["ablation"]
    assert set(ablation) == {"blend"} | {f"without {g}" for g in set(base_feature_groups().values()) | {"affinity"}}
    assert all(0 <= v["recall@5"] <= 1 for v in ablation.values())


def test_compiled_trees_score_exactly_as_lightgbm():
    """The serving path's tree walk equals Booster.predict, with NaNs, zeros and
    one-leaf trees among the inputs."""
    import lightgbm

    from engine.models.tree_scoring import CompiledTrees

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 6)).astype(np.float32)
    X[rng.random(X.shape) < 0.15] = np.nan
    X[rng.random(X.shape) < 0.1] = 0.0
    X[:, 5] = 1.0  # a constant feature: never split on
    y = (np.nan_to_num(X[:, 0]) + 0.5 * np.nan_to_num(X[:, 1]) + rng.normal(size=4000) > 1.0).astype(int)
    params = {"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 20, "verbose": -1, "seed": 0}
    for use_missing in (True, False):
        booster = lightgbm.train(
            {**params, "use_missing": use_missing, "zero_as_missing": not use_missing},
            lightgbm.Dataset(X, y, group=[40] * 100),
            num_boost_round=30,
        )
        np.testing.assert_array_equal(CompiledTrees(booster).predict(X), booster.predict(X))


def test_a_ranker_of_other_features_is_refused_at_build(ranked, tmp_path):
    """A ranker trained on data with other item attributes would read the wrong columns:
    build_bundle refuses it, and publishes nothing."""
    from engine.data.dataset import FeatureTable
    from engine.models.cf import CFModel
    from engine.models.towers import TwoTowerModel
    from index_builder.build import build_bundle

    ds, root, _, engine = ranked
    models = root / "current"
    cf, towers = CFModel.load(models / "cf"), TwoTowerModel.load(models / "towers")
    without_genres = {name: c for name, c in ds.item_features.columns.items() if name != "genres"}
    other = data.Dataset(
        ds.user_idx, ds.item_idx, ds.ratings, ds.timestamps, ds.users, ds.items,
        ds.user_features, FeatureTable(without_genres), ds.item_titles, name=ds.name,
    )  # fmt: skip
    with pytest.raises(TandemError, match="affinity:genres"):
        build_bundle(other, cf, towers, tmp_path / "other", ranker=engine.ranker, log=lambda line: None)
    assert not (tmp_path / "other" / "current").exists()
