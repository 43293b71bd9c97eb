"""The two-stage Engine on a small published bundle: sources, merge and quotas,
filters, cold start, add_items, batch/single agreement, and the CF-only path against
the CF model's brute force."""

import shutil

import numpy as np
import pytest

from engine.errors import InvalidRequest
from engine.index.vector_index import unpack_bits
from engine.serving.engine import Engine, EngineConfig
from engine.serving.retrieval import Proposals, ann_search, merge, quotas
from index_builder import build_bundle


@pytest.fixture(scope="module")
def world(small_models, tmp_path_factory):
    ds, cf, towers = small_models
    root = tmp_path_factory.mktemp("bundles")
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    return ds, cf, towers, root


@pytest.fixture
def engine(world):
    return Engine.load(world[3], EngineConfig(segment_key="occupation"))


@pytest.fixture
def batch_engine(world):
    """The same bundle served by the array pipeline alone (engine.pipeline = "batch")."""
    return Engine.load(world[3], EngineConfig(segment_key="occupation", pipeline="batch"))


def test_merge_deduplicates_and_keeps_every_source():
    c = merge(
        [("a", Proposals.of_one([1, 2, 3])), ("b", Proposals.of_one([3, 4])), ("c", Proposals.of_one([5, 1]))],
        n_candidates=4,
    )
    assert c.items.tolist() == [1, 2, 3, 4]
    assert c.sources == [["a", "c"], ["a"], ["a", "b"], ["b"]]


def test_merge_keeps_users_apart_in_a_batch():
    a = Proposals(np.array([0, 0, 1, 1, 1]), np.array([7, 8, 8, 9, 10]))
    b = Proposals(np.array([0, 1, 1]), np.array([8, 11, 9]))
    c = merge([("a", a), ("b", b)], n_candidates=3)
    assert c.rows.tolist() == [0, 0, 1, 1, 1]
    assert c.items.tolist() == [7, 8, 8, 9, 10]  # user 1's 11 is past its 3 candidates
    assert c.sources == [["a"], ["a", "b"], ["a"], ["a", "b"], ["a"]]


def test_quotas_split_by_weight_among_available_sources():
    assert quotas({"cf": 0.5, "towers": 0.3, "popular": 0.2}, ["cf", "popular"], 70) == {"cf": 50, "popular": 20}
    assert quotas({"cf": 1.0}, ["cf", "towers"], 10) == {"cf": 10, "towers": 1}


def test_known_user_gets_k_unseen_items_from_several_sources(engine, world):
    ds = world[0]
    rec = engine.recommend("u3", k=10)
    assert len(rec) == 10 and np.all(np.diff(rec.scores) <= 0)
    seen = set(ds.items.external(ds.user_items()[ds.users.index("u3")].indices))
    assert not seen & set(rec.item_ids)
    used = {s for srcs in rec.sources for s in srcs}
    assert {"cf", "towers"} <= used
    for name in ("cf", "towers", "popular", "segment", "recent"):  # every source works alone
        alone = engine.recommend("u3", k=5, sources=[name])
        assert len(alone) == 5 and all(srcs == (name,) for srcs in alone.sources), name


def test_cf_only_with_exact_index_equals_cf_brute_force(engine, world):
    _, cf, _, _ = world
    for user in ("u0", "u7", "u42"):
        ours = engine.recommend(user, k=10, sources=["cf"], n_candidates=10)
        ranked = engine.score(user, list(ours.item_ids))  # same blend as recommend
        ref_ids = cf.recommend(user, k=10).item_ids
        assert set(ours.item_ids) == set(ref_ids)
        np.testing.assert_array_equal(ranked.item_ids, ours.item_ids)


@pytest.mark.parametrize("towers_weight, cf_weight, popularity_weight", [(0.5, 0.5, 0.25), (0.2, 0.8, 0.0)])
def test_ranking_scores_are_the_blend_by_its_definition(world, towers_weight, cf_weight, popularity_weight):
    """Ranking folds the blend into per-user factors; its scores must equal the blend
    computed by hand in float64: the weighted mean of the standardised tower score, the
    standardised CF prediction (w . x + user bias + item offset) and the standardised
    log-popularity."""
    _, cf, _, root = world
    weights = EngineConfig(blend_towers=towers_weight, blend_cf=cf_weight, blend_popularity=popularity_weight)
    engine = Engine.load(root, weights)
    for user in ("u3", "u11"):
        single = engine.recommend(user, k=20)
        batch = engine.recommend_batch([user, "u0"], k=20)[0]
        u, items = engine.users.index(user), engine.items.indices(single.item_ids)
        tower = engine.user_tower_vectors[u].astype(np.float64) @ engine.tower_item_vectors[items].T.astype(np.float64)
        prediction = (
            cf.X[items].astype(np.float64) @ cf.W[u].astype(np.float64) + cf.user_bias[u] + cf.item_offsets[items]
        )
        z_tower = (tower - engine.blend.scales["towers"].mean) / engine.blend.scales["towers"].std
        z_cf = (prediction - engine.blend.scales["cf"].mean) / engine.blend.scales["cf"].std
        z_popularity = engine.popularity_score[items].astype(np.float64)
        expected = (towers_weight * z_tower + cf_weight * z_cf + popularity_weight * z_popularity) / (
            towers_weight + cf_weight + popularity_weight
        )
        np.testing.assert_allclose(single.scores, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(batch.scores, single.scores)


def test_filters_apply_inside_retrieval(engine, world):
    ds = world[0]
    label = engine.genre_labels[2]
    rec = engine.recommend("u5", k=10, filters={"genres": [label]})
    assert len(rec) == 10
    cols = engine.genres[ds.items.indices(rec.item_ids)]
    assert cols[:, 2].all()
    block = list(engine.recommend("u5", k=3).item_ids)
    assert not set(block) & set(engine.recommend("u5", k=10, exclude_items=block).item_ids)
    allow = list(ds.items.ids[:20])
    assert set(engine.recommend("u5", k=5, include_items=allow, exclude_seen=False).item_ids) <= set(allow)
    with pytest.raises(ValueError, match="unknown value.*genres"):
        engine.recommend("u5", filters={"genres": ["Nope"]})
    with pytest.raises(ValueError, match="unknown filter"):
        engine.recommend("u5", filters={"colour": "red"})


def test_seen_items_can_be_kept(engine, world):
    ds = world[0]
    seen = set(ds.items.external(ds.user_items()[ds.users.index("u1")].indices))
    rec = engine.recommend("u1", k=50, exclude_seen=False, n_candidates=300)
    assert seen & set(rec.item_ids)


def test_cold_start_paths(engine, world):
    ds = world[0]
    anonymous = engine.recommend("someone-new", k=5)
    top_popular = ds.items.external(np.argsort(-ds.item_counts(), kind="stable")[:5])
    np.testing.assert_array_equal(anonymous.item_ids, top_popular)
    assert all(s == ("popular",) for s in anonymous.sources)
    featured = engine.recommend(user_features={"age": 30, "occupation": "segment-1", "zip_code": "10000"}, k=5)
    used = {s for srcs in featured.sources for s in srcs}
    assert "towers" in used and "segment" in used and "cf" not in used
    folded = engine.recommend(ratings={"i1": 5, "i2": 4, "i3": 1}, k=5)
    assert "cf" in {s for srcs in folded.sources for s in srcs}
    assert not {"i1", "i2", "i3"} & set(folded.item_ids)
    with pytest.raises(ValueError, match="unknown user feature"):
        engine.recommend(user_features={"shoe": 1})


def test_batch_equals_single(engine):
    users = ["u0", "u9", "nobody", "u17"]
    batch = engine.recommend_batch(users, k=7)  # one chunk, one thread
    for user, got in zip(users, batch):
        single = engine.recommend(user, k=7)
        np.testing.assert_array_equal(got.item_ids, single.item_ids)
        np.testing.assert_allclose(got.scores, single.scores)


@pytest.mark.parametrize("users", [["u3", "nobody"], ["nobody", "u3"], ["nobody", "u3", "nobody-2"]])
def test_batch_of_one_known_user_and_unknown_ones_equals_single(engine, world, users):
    """Only the known user has cf/towers/segment/recent proposals, so most proposals of
    the batch belong to one row: the merge must still keep the rows apart (it once took
    such a batch for a lone request, mixing users and returning seen items)."""
    ds = world[0]
    seen = set(ds.items.external(ds.user_items()[ds.users.index("u3")].indices))
    batch = engine.recommend_batch(users, k=10)
    for user, got in zip(users, batch):
        single = engine.recommend(user, k=10)
        np.testing.assert_array_equal(got.item_ids, single.item_ids)
        np.testing.assert_array_equal(got.scores, single.scores)
    assert not seen & set(batch[users.index("u3")].item_ids)


def test_similar_items_and_score(engine, world):
    _, cf, _, _ = world
    sim = engine.similar_items("i4", k=5)
    reference = cf.similar_items("i4", k=5)
    ref_ids, ref_d = reference.item_ids, reference.distances
    np.testing.assert_array_equal(sim.item_ids, ref_ids)
    np.testing.assert_allclose(sim.scores, ref_d, rtol=1e-4)
    scored = engine.score("u2", ["i1", "i2", "i3"])
    assert sorted(scored.item_ids) == ["i1", "i2", "i3"] and np.all(np.diff(scored.scores) <= 0)
    with pytest.raises(KeyError, match="unknown item id"):
        engine.similar_items("nope")


def test_add_items_then_recommend_and_similar(world):
    engine = Engine.load(world[3], EngineConfig(segment_key="occupation"))
    genres = np.zeros(len(engine.genre_labels), np.uint8)
    genres[0] = 1
    n = engine.add_items(
        ["new-1", "new-2"], [{"genres": genres, "year": 2024, "title": "Brand New"}, {"genres": genres, "year": 2023}]
    )
    assert n == world[0].n_items + 2
    allowed = engine.recommend("u3", k=2, include_items=["new-1", "new-2"], sources=["towers"])
    assert set(allowed.item_ids) == {"new-1", "new-2"}
    sim = engine.similar_items("new-1", k=3)
    assert len(sim) == 3 and "new-1" not in sim.item_ids and sim.sources[0] == ("towers",)
    assert engine.title("new-1") == "Brand New"
    with pytest.raises(ValueError, match="already in the catalogue"):
        engine.add_items(["new-1"], [{}])


def test_every_recommendation_says_how_its_user_was_known(engine):
    """An unknown id served by popularity is never silent: every result names its path."""
    assert engine.recommend("u3").served_by == "known user"
    assert engine.recommend("nobody").served_by == "popularity"
    assert engine.recommend(user_features={"age": 30}).served_by == "features"
    assert engine.recommend(ratings={"i1": 5, "i2": 4}).served_by == "fold-in"
    assert engine.recommend("u3", ratings={"i1": 5}).served_by == "fold-in"
    assert [r.served_by for r in engine.recommend_batch(["u3", "nobody", "u4"])] == [
        "known user",
        "popularity",
        "known user",
    ]


def test_an_unknown_pipeline_is_refused():
    with pytest.raises(ValueError, match="engine.pipeline must be one of"):
        EngineConfig(pipeline="quantum")


def test_request_limits(engine):
    with pytest.raises(ValueError, match="k must be"):
        engine.recommend("u1", k=0)
    with pytest.raises(ValueError, match="n_candidates"):
        engine.recommend("u1", n_candidates=10**9)
    with pytest.raises(ValueError, match="unknown source"):
        engine.recommend("u1", sources=["magic"])


def test_engine_config_from_tandem_toml_and_candidates(engine):
    from engine.cli import engine_config
    from engine.config import load_config

    cfg = engine_config(load_config(None, ["engine.blend_cf=0.0", "engine.segment_key=occupation"]))
    assert cfg.blend_cf == 0.0 and cfg.segment_key == "occupation"
    proposals = engine.candidates("u3", n_candidates=100)
    assert set(proposals) == {"cf", "towers", "popular", "segment", "recent"}
    assert sum(len(p) for p in proposals.values()) <= 100 + len(proposals)


def test_a_threads_bitmap_updated_in_place_equals_one_built_afresh(engine):
    """A lone request without filters restores only the previous request's excluded bits
    in its thread's bitmap: after any sequence of users, with and without filters and
    exclusions, the bitmap is the one built from scratch."""
    cat = engine._catalogue
    genre = {"genres": [engine.genre_labels[2]]}
    sequence = [("u1", None), ("u2", None), ("u3", genre), ("u4", None), ("u5", None), ("u1", None), ("u6", genre)]
    for user, filters in sequence:
        mask, _ = engine._item_mask(cat, None, None, filters)
        requests = engine.user_context.requests(cat, [user], True, mask)
        assert requests.n_excluded[0] > 0  # every one of these users has seen items
        allowed = mask.copy()
        allowed[requests.excluded_indices] = False
        np.testing.assert_array_equal(unpack_bits(requests.lone_bitmap(), cat.n_items), allowed)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"filters": "genre 2", "exclude_items": ["i1", "i2", "i3"]},
        {"include_items": 60, "n_candidates": 40},  # a small allow-list: batched lists run short
        {"exclude_seen": False, "sources": ["recent", "segment", "popular"]},
    ],
    ids=["plain", "filtered", "allow-list", "seen-kept"],
)
def test_threaded_batch_equals_single(engine, options, monkeypatch):
    """The batched pipeline (flat arrays, shared-mask searches, stragglers served alone)
    gives every user exactly the single request's answer (exact indexes here)."""
    monkeypatch.setattr("engine.serving.engine.BATCH_CHUNK", 64)  # 151 users: 3 chunks over two threads
    options = dict(options)
    if "filters" in options:
        options["filters"] = {"genres": [engine.genre_labels[2]]}
    if "include_items" in options:
        options["include_items"] = list(engine.items.ids[::3][: options["include_items"]])
    users = [f"u{i}" for i in range(150)] + ["nobody"]
    batch = engine.recommend_batch(users, k=5, threads=2, **options)
    for user, got in zip(users, batch):
        single = engine.recommend(user, k=5, **options)
        np.testing.assert_array_equal(got.item_ids, single.item_ids)
        np.testing.assert_array_equal(got.scores, single.scores)  # bitwise: one product per user
        assert got.sources == single.sources and got.candidates == single.candidates


def test_lone_requests_on_many_threads_keep_their_own_exclusions(engine):
    """Lone requests reuse a per-thread FAISS bitmap of the user's excluded items: users
    served concurrently, and one after another on each thread, must each get exactly
    what they get served alone on a quiet engine."""
    import concurrent.futures

    users = [f"u{i}" for i in range(40)]
    options = [{}, {"filters": {"genres": [engine.genre_labels[2]]}}]
    expected = {(u, j): engine.recommend(u, k=8, **o) for u in users for j, o in enumerate(options)}
    jobs = [(u, j) for _ in range(3) for u in users for j in range(len(options))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: engine.recommend(job[0], k=8, **options[job[1]]), jobs))
    for job, rec in zip(jobs, got):
        np.testing.assert_array_equal(rec.item_ids, expected[job].item_ids)
        np.testing.assert_array_equal(rec.scores, expected[job].scores)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"filters": "genre 2", "exclude_items": ["i1", "i2", "i3"]},
        {"include_items": 60, "n_candidates": 40},
        {"exclude_seen": False, "sources": ["recent", "segment", "popular"]},
        {"n_candidates": 7},  # the cap cuts into the first sources' lists
        {"sources": ["towers", "recent"]},
    ],
    ids=["plain", "filtered", "allow-list", "seen-kept", "tiny-cap", "two-sources"],
)
def test_compiled_lone_merge_equals_the_generic_path(engine, batch_engine, options):
    """A lone request's compiled merge (engine.pipeline = "compiled") gives exactly the
    candidates, scores, sources and counts of the array pipeline ("batch")."""
    options = dict(options)
    if "filters" in options:
        options["filters"] = {"genres": [engine.genre_labels[2]]}
    if "include_items" in options:
        options["include_items"] = list(engine.items.ids[::3][: options["include_items"]])
    requests = [{"user_id": f"u{i}"} for i in range(0, 150, 3)] + [
        {"user_id": "nobody"},
        {"user_features": {"age": 30, "occupation": "segment-1", "zip_code": "10000"}},
        {"ratings": {"i1": 5, "i2": 4, "i3": 1, "i9": 5}},  # fold-in: recent likes from the ratings
    ]
    for request in requests:
        got = engine.recommend(**request, k=9, **options)
        want = batch_engine.recommend(**request, k=9, **options)
        np.testing.assert_array_equal(got.item_ids, want.item_ids)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert got.sources == want.sources and got.candidates == want.candidates


def test_compiled_lone_merge_searches_live_when_filters_exhaust_the_table(engine, batch_engine, monkeypatch):
    """Where a recent like's table row runs out of allowed items, the compiled path has
    the recent source search live, as the generic path does, with the same answer."""
    liked = engine.user_context.requests(engine._catalogue, ["u3"], True, engine._catalogue.every_item).recent_liked[0]
    tabled = engine.sources["recent"].neighbours[liked[liked >= 0]].ravel()
    blocked = list(engine.items.external(np.unique(tabled[tabled >= 0])))
    live = []
    search = engine.sources["recent"].propose_alone
    monkeypatch.setattr(engine.sources["recent"], "propose_alone", lambda *a: live.append(a) or search(*a))
    rec = engine.recommend("u3", k=20, exclude_items=blocked)
    assert live  # the live search ran
    assert "recent" in {s for srcs in rec.sources for s in srcs} and not set(blocked) & set(rec.item_ids)
    want = batch_engine.recommend("u3", k=20, exclude_items=blocked)
    np.testing.assert_array_equal(rec.item_ids, want.item_ids)
    assert rec.sources == want.sources and rec.candidates == want.candidates


@pytest.fixture(scope="module")
def tabled_engine(world, tmp_path_factory):
    """An engine on a copy of the bundle root without items added live (other tests add
    some, and they retire the towers table)."""
    import shutil

    root = tmp_path_factory.mktemp("pristine") / "root"
    shutil.copytree(world[3], root, symlinks=True, ignore=shutil.ignore_patterns("added_items.jsonl"))
    return Engine.load(root, EngineConfig(segment_key="occupation"))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"filters": "genre 2"},
        {"include_items": 40, "n_candidates": 40},  # rows run out of allowed items: those users search
        {"exclude_seen": False},  # the tables drop seen items: not used
        {"n_candidates": 3000},  # quotas beyond the rows' 256 items: searched
        {"sources": ["towers", "cf"], "n_candidates": 60},
    ],
    ids=["plain", "filtered", "allow-list", "seen-kept", "deep", "two-sources"],
)
def test_user_top_tables_answer_as_the_live_search(tabled_engine, options, monkeypatch):
    """The CF and two-tower sources read a known user's precomputed top unseen items
    instead of searching: over exact (Flat) indexes that gives the live search's
    answers, alone, in a batch, for a fold-in and for a new user alike."""
    engine, options = tabled_engine, dict(options)
    if "filters" in options:
        options["filters"] = {"genres": [engine.genre_labels[2]]}
    if "include_items" in options:
        options["include_items"] = list(engine.items.ids[::5][: options["include_items"]])
    users = [f"u{i}" for i in range(0, 200, 7)]
    requests = [{"user_id": u} for u in users] + [
        {"user_features": {"age": 30, "occupation": "segment-1", "zip_code": "10000"}},
        {"user_id": "u3", "ratings": {"i1": 5, "i2": 4, "i9": 5}},
    ]
    tables = {name: engine.sources[name].top_items for name in ("cf", "towers")}
    assert all(t is not None and t.shape == (400, 256) for t in tables.values())
    got = [engine.recommend(**r, k=9, **options) for r in requests]
    got_batch = engine.recommend_batch(users, k=9, **options)
    for name in tables:
        monkeypatch.setattr(engine.sources[name], "top_items", None)
    want = [engine.recommend(**r, k=9, **options) for r in requests]
    for a, b in zip(got + got_batch, want + want[: len(users)]):
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        assert a.sources == b.sources and a.candidates == b.candidates


@pytest.fixture
def searched(monkeypatch) -> list:
    """The FAISS indexes searched (engine.serving.retrieval.ann_search) while the test runs."""
    indexes: list = []
    monkeypatch.setattr(
        "engine.serving.retrieval.ann_search", lambda index, *a: indexes.append(index) or ann_search(index, *a)
    )
    return indexes


def test_known_users_plain_request_does_not_search_cf_or_towers(tabled_engine, searched):
    engine = tabled_engine
    engine.recommend("u5", k=10)
    engine.recommend_batch(["u5", "u6"], k=10)
    assert not {id(engine.sources[name].index) for name in ("cf", "towers")} & {id(i) for i in searched}
    engine.recommend("u5", k=10, exclude_seen=False)  # the tables do not apply: both search
    assert {id(engine.sources[name].index) for name in ("cf", "towers")} <= {id(i) for i in searched}


def test_a_short_table_row_answers_unfiltered_requests_and_filtered_ones_search(tabled_engine, monkeypatch, searched):
    """A row with fewer than K items holds everything the index returned for the user:
    an unfiltered request takes it as it is; a filtered one that it leaves short searches."""
    engine = tabled_engine
    u = engine.users.index("u8")
    table = engine.sources["towers"].top_items.copy()
    table[u, 40:] = -1  # as if the HNSW search had found 40 items only
    monkeypatch.setattr(engine.sources["towers"], "top_items", table)
    plain = engine.candidates("u8", n_candidates=100, sources=["towers"])["towers"]
    assert plain.tolist() == table[u, :40].tolist() and not searched
    genre = engine.genre_labels[2]
    in_row = int(engine.attributes.mask({"genres": [genre]}, len(engine.items))[table[u, :40]].sum())
    got = engine.recommend("u8", k=25, n_candidates=100, sources=["towers"], filters={"genres": [genre]})
    assert searched and len(got) == 25 > in_row  # more than the row holds of that genre


def test_added_items_retire_the_per_user_tables(world, tabled_engine):
    """The per-user tables rank the bundle's items only; once items are added live each
    model's source searches its index, which holds the new vectors (the towers' own, CF's
    borrowed from the content neighbours), so they can be proposed."""
    engine = Engine.load(tabled_engine.bundle.path, EngineConfig(segment_key="occupation"))
    assert engine.sources["towers"].top_items is not None and engine.sources["cf"].top_items is not None
    engine.add_items(["fresh"], [{"year": 2024}], persist=False)
    assert engine.sources["towers"].top_items is None and engine.sources["cf"].top_items is None
    assert len(engine.sources["cf"].index) == len(engine.items)
    scores = engine.user_tower_vectors @ engine.tower_item_vectors.T  # exact, the added item included
    ui = world[0].user_items()
    for u in range(len(scores)):
        scores[u, ui[u].indices] = -np.inf
    fresh = engine.items.index("fresh")
    u = int(np.argmax((scores > scores[:, [fresh]]).sum(1) * -1))  # the user who ranks it highest
    want = np.argsort(-scores[u], kind="stable")[:50]
    assert fresh in want
    got = engine.candidates(engine.users.ids[u], n_candidates=50, sources=["towers"])["towers"]
    assert set(got.tolist()) == set(want.tolist())


def test_item_neighbour_table_is_the_exact_squared_distance_order(engine, world):
    _, cf, _, root = world
    table = engine.sources["recent"].neighbours
    assert table.shape == (cf.X.shape[0], 32)
    for i in (0, 7, 123):
        d = ((cf.X - cf.X[i]) ** 2).sum(1)
        d[i] = np.inf
        np.testing.assert_allclose(d[table[i]], np.sort(d)[:32], rtol=1e-5)  # Flat index here: exact


def test_recent_source_searches_live_when_filters_exhaust_the_table(engine):
    liked = engine.user_context.requests(engine._catalogue, ["u3"], True, engine._catalogue.every_item).recent_liked[0]
    far = engine.sources["recent"].neighbours[liked[liked >= 0]].ravel()
    mask = np.ones(len(engine.items), bool)
    mask[far[far >= 0]] = False  # a filter that removes every tabled neighbour
    requests = engine.user_context.requests(engine._catalogue, ["u3"], True, mask)
    allowed = requests.allowed_of(0, np.arange(len(engine.items)))
    proposed = engine.sources["recent"].propose(requests, np.array([20])).items
    # Up to 20 (likes may share neighbours), all allowed, all found beyond the table.
    assert len(proposed) >= 15 and allowed[proposed].all()


def test_added_items_survive_reload_and_travel_with_the_next_bundle(world, tmp_path):
    import shutil

    ds, cf, towers, root = world
    mine = tmp_path / "root"
    shutil.copytree(root, mine, symlinks=True)
    engine = Engine.load(mine, EngineConfig(segment_key="occupation"))
    engine.add_items(["late-1"], [{"year": 2025, "title": "Late Arrival"}])
    again = Engine.load(mine, EngineConfig(segment_key="occupation"))  # a reload or restart
    assert "late-1" in again.items and again.title("late-1") == "Late Arrival"
    build_bundle(ds, cf, towers, mine, log=lambda line: None)  # make index
    (mine / "added_items.jsonl").unlink()  # the new bundle alone carries the item now
    rebuilt = Engine.load(mine, EngineConfig(segment_key="occupation"))
    assert rebuilt.version != engine.version and "late-1" in rebuilt.items
    np.testing.assert_allclose(
        rebuilt.tower_item_vectors[rebuilt.items.index("late-1")],
        again.tower_item_vectors[again.items.index("late-1")],
        rtol=1e-5,
    )


def test_the_add_journal_survives_a_torn_tail_and_bad_lines(world, tmp_path, caplog):
    """A crash mid-append leaves a torn last line: it is ignored at load, and cut off by
    the next append, so the item added after it survives the next start. A bad line
    anywhere is logged (file and line) and skipped, never a failure to start."""
    import shutil

    mine = tmp_path / "root"
    shutil.copytree(world[3], mine, symlinks=True)
    journal = mine / "added_items.jsonl"
    journal.write_text('{"item_id": "y", "features": {"year": 2020}}\n{"item_id": "x", "feat')  # torn append
    engine = Engine.load(mine)
    assert "y" in engine.items and "x" not in engine.items
    engine.add_items(["z"], [{"year": 2021}])
    assert journal.read_text().endswith('"item_id": "z", "title": ""}\n')
    again = Engine.load(mine)
    assert {"y", "z"} <= set(again.items.ids.tolist()) and "x" not in again.items
    journal.write_text('not json\n{"item_id": "y", "features": {}}\n{"item_id": "w", "features": {"shoe": 1}}\n')
    with caplog.at_level("WARNING"):
        loaded = Engine.load(mine)
    assert "y" in loaded.items and "w" not in loaded.items  # an unknown feature: skipped alone
    assert "added_items.jsonl" in caplog.text and "line 1" in caplog.text and "shoe" in caplog.text


def test_batch_stops_at_its_deadline(engine):
    import time

    with pytest.raises(TimeoutError, match="deadline passed after 0 of 3 users"):
        engine.recommend_batch(["u1", "u2", "u3"], deadline=time.monotonic() - 1)
    assert len(engine.recommend_batch(["u1", "u2", "u3"], deadline=time.monotonic() + 60)) == 3


def test_batch_equals_single_with_live_added_items(engine, monkeypatch):
    """Items added live (tower vector, no CF vector) rank the same alone and in a batch."""
    monkeypatch.setattr("engine.serving.engine.BATCH_CHUNK", 8)
    engine.add_items([f"live-{i}" for i in range(5)], [{"year": 2020 + i} for i in range(5)], persist=False)
    users = [f"u{i}" for i in range(20)]
    allowed = [f"live-{i}" for i in range(5)] + list(engine.items.ids[:30])
    batch = engine.recommend_batch(users, k=8, include_items=allowed, threads=2)
    for user, got in zip(users, batch):
        single = engine.recommend(user, k=8, include_items=allowed)
        np.testing.assert_array_equal(got.item_ids, single.item_ids)
        np.testing.assert_array_equal(got.scores, single.scores)
    assert any(i.startswith("live-") for got in batch for i in got.item_ids)


def test_batch_exclusions_by_bitmap_and_by_search_agree(engine, monkeypatch):
    """Past EXCLUSION_BITMAP_BITS a batch checks exclusions by binary search: same answers."""
    users = [f"u{i}" for i in range(40)]
    by_bitmap = engine.recommend_batch(users, k=6, threads=1)
    monkeypatch.setattr("engine.serving.retrieval.EXCLUSION_BITMAP_BITS", 0)
    by_search = engine.recommend_batch(users, k=6, threads=1)
    for a, b in zip(by_bitmap, by_search):
        np.testing.assert_array_equal(a.item_ids, b.item_ids)


def test_a_rejected_add_changes_nothing(world):
    """An add refused half-way (a genre flag of 300) leaves the catalogue as it was, and
    the next add gets its own vector, not a neighbour's."""
    engine = Engine.load(world[3], EngineConfig(segment_key="occupation"))
    before = engine._catalogue
    flags = [0] * len(engine.genre_labels)
    with pytest.raises(InvalidRequest, match="flags"):
        engine.add_items(["ok-1", "bad-1"], [{"year": 2020}, {"genres": [300] + flags[1:]}])
    assert engine._catalogue is before and "ok-1" not in engine.items
    engine.add_items(["ok-2"], [{"year": 2021, "genres": [1] + flags[1:]}])
    expected = engine.towers.item_embeddings([{"year": 2021, "genres": [1] + flags[1:]}])[0]
    np.testing.assert_array_equal(engine.tower_item_vectors[engine.items.index("ok-2")], expected)
    n = len(engine.items)
    assert engine.tower_item_vectors.shape[0] == engine.genres.shape[0] == len(engine.popularity) == n
    assert len(engine.sources["towers"].index) == n and engine.genres[-1, 0] == 1


def test_long_titles_and_ids_cost_their_own_length(world):
    """Strings of items added live are stored one by one: a long title does not widen
    every title (a fixed-width array would multiply it by the catalogue size)."""
    engine = Engine.load(world[3], EngineConfig(segment_key="occupation"))
    long_id, long_title = "i" * 256, "t" * 1024
    engine.add_items([long_id], [{"title": long_title}])
    assert engine.titles.dtype == object and engine.items.ids.dtype == object
    assert engine.titles.nbytes < 16 * len(engine.items)  # pointers, not 1,024 characters per title
    assert engine.title(long_id) == long_title and engine.similar_items(long_id, k=2).item_ids.dtype.kind == "U"
    with pytest.raises(InvalidRequest, match="at most 256"):
        engine.add_items(["j" * 257], [{}])


def test_compiled_merge_refuses_an_item_outside_the_catalogue(engine, monkeypatch):
    """The compiled merge has no bounds checks of its own: an out-of-range item must
    raise, never read or write past its arrays."""
    towers = engine.sources["towers"]
    monkeypatch.setattr(towers, "propose_alone", lambda *a: np.array([len(engine.items) + 10**6]))
    with pytest.raises(IndexError, match="outside the catalogue"):
        engine.recommend("u3", sources=["towers"])


def test_likes_given_with_a_request_follow_the_datas_rule(world, tmp_path):
    """On implicit data every interaction is a like, in the bundle's recent likes and in
    the ratings a request brings alike (the two once disagreed: a folded-in user on
    implicit data got no "recent" candidates)."""
    import json
    import shutil

    from engine.data.dataset import liked_mask

    assert liked_mask(np.array([1.0, 1.0]), implicit=True).all()
    assert liked_mask(np.array([5.0, 3.0]), implicit=False).tolist() == [True, False]
    assert world[0].implicit is False and world[0].liked().tolist() == (world[0].ratings >= 4).tolist()
    version = tmp_path / "bundle"
    shutil.copytree(world[3] / "current", version)
    explicit = Engine.load(version)
    assert explicit.recommend(ratings={"i1": 1.0, "i2": 1.0}).candidates.get("recent") is None
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["dataset"]["implicit"] = True
    (version / "manifest.json").write_text(json.dumps(manifest))
    implicit = Engine.load(version)
    assert implicit.recommend(ratings={"i1": 1.0, "i2": 1.0}).candidates["recent"] > 0


def test_a_clone_of_a_popular_item_added_live_ranks_near_it(world, tmp_path):
    """Items added live have no CF vector of their own. The blend used to count CF's mean
    for them (z = 0) with CF's full weight, so a clone of a popular item (same genres and
    year) sank far below it; it is now scored on the evidence it has: its tower vector
    and the CF vector of the bundle items of its content (live_items)."""
    ds = world[0]
    root = tmp_path / "root"
    shutil.copytree(world[3], root, symlinks=True)
    # Without the popularity term: a clone has no interactions, which popularity counts
    # against it on purpose; this test is about the models' evidence.
    engine = Engine.load(root, EngineConfig(segment_key="occupation", blend_popularity=0.0))
    popular = np.argsort(-ds.item_counts(), kind="stable")[:10]
    table = ds.item_features
    clones = [f"clone-{i}" for i in popular]
    features = [
        {"genres": table.columns["genres"][i].tolist(), "year": float(table.columns["year"][i])} for i in popular
    ]
    engine.add_items(clones, features, persist=False)
    gaps = []
    for user in ds.users.ids[:40]:
        originals = engine.score(user, [str(ds.items.ids[i]) for i in popular])
        copies = engine.score(user, clones)
        by_item = dict(zip(originals.item_ids.tolist(), originals.scores.tolist()))
        by_clone = dict(zip(copies.item_ids.tolist(), copies.scores.tolist()))
        gaps += [by_item[str(ds.items.ids[i])] - by_clone[f"clone-{i}"] for i in popular]
    spread = float(np.std(engine.score(ds.users.ids[0], list(ds.items.ids)).scores))
    # Near: the median gap is a fraction of the spread of one user's scores over the catalogue.
    assert abs(float(np.median(gaps))) < 0.5 * spread, (np.median(gaps), spread)
    # Alone and in a batch the same (the renormalisation is per pair).
    alone = engine.recommend("u3", k=20, exclude_seen=False, include_items=clones + list(ds.items.ids[:20]))
    batch = engine.recommend_batch(
        ["u3", "u4"], k=20, exclude_seen=False, include_items=clones + list(ds.items.ids[:20])
    )
    np.testing.assert_array_equal(alone.scores, batch[0].scores)


def test_the_popularity_weight_blends_log_popularity_into_every_score(world):
    """engine.blend_popularity adds the items' standardised log-popularity to the blend:
    score = (w_t z_t + w_c z_c + w_p z_p) / (w_t + w_c + w_p), alone and in a batch."""
    root = world[3]
    plain = Engine.load(root, EngineConfig(blend_popularity=0.0))
    mixed = Engine.load(root, EngineConfig(blend_popularity=1.0))
    items = list(plain.items.ids[:25])
    for user in ("u3", "u7"):
        a, b = plain.score(user, items), mixed.score(user, items)
        base = dict(zip(a.item_ids.tolist(), a.scores.tolist()))
        pop = plain.popularity_score[plain.items.indices(b.item_ids)]
        expected = (np.array([base[i] for i in b.item_ids]) * 1.0 + 1.0 * pop) / 2.0  # weights 0.5 + 0.5, then 1
        np.testing.assert_allclose(b.scores, expected, rtol=1e-4, atol=1e-5)
    batch = mixed.recommend_batch(["u3", "u7"], k=10)
    for user, got in zip(["u3", "u7"], batch):
        np.testing.assert_array_equal(got.scores, mixed.recommend(user, k=10).scores)
    with pytest.raises(ValueError, match="popularity weight"):
        Engine.load(root, EngineConfig(blend_popularity=-1.0))
