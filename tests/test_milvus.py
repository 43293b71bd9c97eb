"""The Milvus backend end to end, on Milvus Lite (an embedded file): a bundle built with
``index.backend = "milvus"`` serves exactly what the same bundle on FAISS serves (Flat
indexes), through the library and the gRPC service; publishing moves the root's aliases,
rollback moves them back, pruning and a refused publish drop collections; and an alias
swap under concurrent requests fails none. Skipped, with the reason, where pymilvus is
not installed (the ``milvus`` extra)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus backend needs the milvus extra (pip install -e '.[milvus]')")

from engine.index import bundle, milvus_index  # noqa: E402
from engine.service.client import Client  # noqa: E402
from engine.service.server import ServerConfig, TandemServer  # noqa: E402
from engine.serving.engine import Engine, EngineConfig  # noqa: E402
from index_builder import build_bundle  # noqa: E402
from index_builder.build import PublishRefused  # noqa: E402

CONFIG = EngineConfig(segment_key="occupation")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return milvus_index.MilvusTarget.of(str(tmp_path_factory.mktemp("milvus") / "tandem.db"))


@pytest.fixture(scope="module")
def roots(small_models, target, tmp_path_factory):
    """The same models published twice: FAISS Flat files, and Milvus FLAT collections."""
    ds, cf, towers = small_models
    base = tmp_path_factory.mktemp("backends")
    quiet = {"factory": "Flat", "log": lambda line: None}
    build_bundle(ds, cf, towers, base / "faiss", **quiet)
    build_bundle(ds, cf, towers, base / "milvus", milvus=target, **quiet)
    return ds, base / "faiss", base / "milvus"


def same(a, b):
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert a.sources == b.sources and a.served_by == b.served_by


def test_the_milvus_bundle_serves_what_the_faiss_bundle_serves(roots):
    ds, faiss_root, milvus_root = roots
    on_faiss, on_milvus = Engine.load(faiss_root, CONFIG), Engine.load(milvus_root, CONFIG)
    assert type(on_milvus.bundle.index("cf_ip")).__name__ == "MilvusIndex"
    genre = on_faiss.genre_labels[1]
    requests = [
        {"user_id": ds.users.ids[0]},  # the per-user tables
        {"user_id": ds.users.ids[1], "exclude_seen": False},  # searched, seen items kept
        {"user_id": ds.users.ids[2], "filters": {"genres": [genre]}},  # a filter pushed into the search
        {"ratings": {ds.items.ids[0]: 5, ds.items.ids[3]: 4}},  # fold-in: searched
        {"user_features": {"age": 30, "occupation": "writer"}},  # a new user by features
    ]
    for request in requests:
        same(on_milvus.recommend(k=10, **request), on_faiss.recommend(k=10, **request))
    for item in ds.items.ids[:5]:
        same(on_milvus.similar_items(item, k=5), on_faiss.similar_items(item, k=5))
    users = list(ds.users.ids[:30]) + ["nobody"]
    for a, b in zip(on_milvus.recommend_batch(users, k=5), on_faiss.recommend_batch(users, k=5)):
        same(a, b)
    # Items added live and events recorded live: the same on both.
    for engine in (on_faiss, on_milvus):
        engine.add_items(["fresh-1", "fresh-2"], [{"year": 1999}, {"year": 2001}], persist=False)
        engine.record([{"user_id": "visitor", "item_id": ds.items.ids[7], "kind": "click"}], persist=False)
    same(on_milvus.similar_items("fresh-1", k=5), on_faiss.similar_items("fresh-1", k=5))
    for request in ({"user_features": {"age": 20}}, {"user_id": "visitor"}, {"user_id": ds.users.ids[4]}):
        same(
            on_milvus.recommend(k=10, exclude_seen=False, **request),
            on_faiss.recommend(k=10, exclude_seen=False, **request),
        )


def test_attribute_filters_are_searched_on_the_collections_fields(roots, monkeypatch):
    """The collections hold the item attributes as fields, and a request's attribute
    filters become a Milvus expression on them (seen items as an id list beside): the
    same answers as FAISS, for labels (any, all), ranges and both together; with no id
    list allowed at all, the seen items are dropped from an over-fetched result."""
    ds, faiss_root, milvus_root = roots
    on_faiss, on_milvus = Engine.load(faiss_root, CONFIG), Engine.load(milvus_root, CONFIG)
    assert set(on_milvus.bundle.index("cf_ip").attributes) == {"genres", "year"}
    expressions: list[str] = []
    search = milvus_index._call

    def spy(target, method, *args, **kwargs):
        if method == "search":
            expressions.append(kwargs.get("filter", ""))
        return search(target, method, *args, **kwargs)

    monkeypatch.setattr(milvus_index, "_call", spy)
    g = on_faiss.genre_labels
    filters = [
        {"genres": [g[1], g[2]]},
        {"genres": {"all": [g[0], g[3]]}},
        {"year": {"gte": 1990, "lt": 2005}},
        {"genres": [g[4]], "year": {"gt": 1980}},
    ]
    requests = [{"ratings": {ds.items.ids[0]: 5, ds.items.ids[1]: 4}}, {"user_id": ds.users.ids[5]}]
    for limit in (milvus_index.MAX_EXPRESSION_IDS, 0):  # short item lists allowed in expressions, or none
        monkeypatch.setattr(milvus_index, "MAX_EXPRESSION_IDS", limit)
        expressions.clear()
        for f in filters:
            for request in requests:
                same(on_milvus.recommend(k=10, filters=f, **request), on_faiss.recommend(k=10, filters=f, **request))
    assert expressions and not any("id in" in e or "id not in" in e for e in expressions)  # no id list at all
    assert any("array_contains_any" in e for e in expressions) and any("array_contains_all" in e for e in expressions)
    assert any(">= 1990.0" in e and "< 2005.0" in e for e in expressions)


def test_the_service_on_milvus_answers_as_the_library(roots):
    ds, _, milvus_root = roots
    library = Engine.load(milvus_root, CONFIG)
    server = TandemServer(milvus_root, ServerConfig(port=0, watch_interval=0), CONFIG).start()
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            same(
                client.recommend(ratings={ds.items.ids[0]: 5}, k=8),
                library.recommend(ratings={ds.items.ids[0]: 5}, k=8),
            )
            same(client.similar_items(ds.items.ids[2], k=6), library.similar_items(ds.items.ids[2], k=6))
    finally:
        server.stop(0)


def collections_of(root):
    manifest = bundle.read_manifest(bundle.resolve(root), verify=False)
    return {name: report["milvus"]["collection"] for name, report in manifest.indexes.items()}


def test_publish_moves_the_aliases_rollback_moves_them_back_and_prune_drops(small_models, target, tmp_path):
    ds, cf, towers = small_models
    root = tmp_path / "root"
    quiet = {"factory": "Flat", "milvus": target, "log": lambda line: None, "keep": 2}
    build_bundle(ds, cf, towers, root, **quiet)
    first = collections_of(root)
    build_bundle(ds, cf, towers, root, **quiet)
    second = collections_of(root)
    alias = {name: milvus_index.alias_name(root, name) for name in first}
    assert {n: milvus_index.collection_of_alias(target, a) for n, a in alias.items()} == second
    bundle.rollback(root)
    assert {n: milvus_index.collection_of_alias(target, a) for n, a in alias.items()} == first
    bundle.set_current(root, bundle.list_versions(root)[-1])
    build_bundle(ds, cf, towers, root, **quiet)  # keep=2: the first version and its collections go
    existing = set(milvus_index._call(target, "list_collections"))
    assert not set(first.values()) & existing and set(second.values()) <= existing
    before = existing
    with pytest.raises(PublishRefused):
        build_bundle(ds, cf, towers, root, **{**quiet, "recall_floor": 1.01})
    assert set(milvus_index._call(target, "list_collections")) == before  # the refused build's are dropped


def test_an_alias_swap_under_concurrent_requests_fails_none(small_models, target, tmp_path):
    """Readers send requests that search Milvus (fold-in ratings, similar items) while
    new versions are published and reloaded: every request succeeds, and the alias
    ends on the version served."""
    ds, cf, towers = small_models
    root = tmp_path / "root"
    quiet = {"factory": "Flat", "milvus": target, "log": lambda line: None}
    build_bundle(ds, cf, towers, root, **quiet)
    server = TandemServer(root, ServerConfig(port=0, watch_interval=0.1), CONFIG).start()
    stop, errors, served = threading.Event(), [], [0]

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(f"127.0.0.1:{server.port}") as client:
            while not stop.is_set():
                try:
                    items = ds.items.ids[rng.integers(0, ds.n_items, 2)]
                    assert len(client.recommend(ratings={items[0]: 5, items[1]: 3}, k=5)) == 5
                    assert len(client.similar_items(items[0], k=3)) == 3
                    served[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    errors.append(repr(e))

    readers = [threading.Thread(target=read, args=(s,)) for s in range(2)]
    try:
        for t in readers:
            t.start()
        for _ in range(2):
            build_bundle(ds, cf, towers, root, **quiet)
            with Client(f"127.0.0.1:{server.port}") as admin:
                admin.reload()
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
        server.stop(0)
    assert errors == [] and served[0] > 0
    current = collections_of(root)
    assert {n: milvus_index.collection_of_alias(target, milvus_index.alias_name(root, n)) for n in current} == current


def test_index_backend_milvus_in_the_configuration_publishes_to_milvus(small_models, tmp_path):
    from engine.config import load_config
    from index_builder.train import publish

    ds, cf, towers = small_models
    db = tmp_path / "settings.db"
    config = load_config(None, ["index.backend=milvus", f'index.milvus_uri="{db}"', "index.factory=Flat"])
    published = publish(ds, cf, towers, tmp_path / "root", config, log=lambda line: None)
    manifest = bundle.read_manifest(published)
    assert {report["milvus"]["uri"] for report in manifest.indexes.values()} == {str(db)}
    assert (published / "cf_ip.milvus.json").is_file() and not (published / "cf_ip.faiss").exists()
    with pytest.raises(ValueError, match="index.backend must be one of"):
        load_config(None, ["index.backend=annoy"])
