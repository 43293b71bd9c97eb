"""Your own data end to end: side tables of item attributes (categories, prices, tags,
titles) through training, the bundle, filters on any attribute (library and gRPC), new
items described by label names, added items tied to their dataset, and other shapes of
data (a ratings.csv-family directory, a Parquet file with renamed columns) through
eval-pipeline."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from engine import Engine, data
from engine.cli import main
from engine.config import load_config
from engine.data.side_tables import read_side_table, with_side_tables
from engine.errors import DataFormatError, InvalidRequest
from index_builder.train import train_and_publish

CATEGORIES = ("shoes", "hats", "bags")
TAGS = ("red", "blue", "sale", "new")


def shop(tmp_path, n_users=80, n_items=60):
    """An implicit CSV with string ids and a side table of the items' category, price,
    tags and name (seeded), plus a row for an item nobody bought."""
    rng = np.random.default_rng(0)
    rows = {(f"user-{u}", f"sku-{int(i)}") for u in range(n_users) for i in rng.zipf(1.3, 14) % n_items}
    interactions = tmp_path / "interactions.csv"
    interactions.write_text("customer,product\n" + "".join(f"{u},{i}\n" for u, i in sorted(rows)))
    lines = ["product,category,price,tags,title"]
    for i in range(n_items):
        tags = "|".join(t for t in TAGS if rng.random() < 0.4)
        lines.append(f"sku-{i},{CATEGORIES[i % 3]},{10 + 5 * (i % 20)},{tags},Item number {i}")
    lines.append("sku-unsold,hats,99,red,Never sold")
    items = tmp_path / "items.csv"
    items.write_text("\n".join(lines) + "\n")
    return interactions, items


def shop_config(tmp_path, items):
    config = load_config(
        None,
        [
            "data.columns.user=customer",
            "data.columns.item=product",
            f"data.item_features={items}",
            "cf.epochs=3",
            "towers.epochs=2",
            f"paths.bundles={tmp_path / 'bundles'}",
        ],
    )
    return config


@pytest.fixture(scope="module")
def shop_engine(tmp_path_factory):
    """A bundle published by the library from the shop data with its side table."""
    from engine.config import load_dataset

    tmp_path = tmp_path_factory.mktemp("shop")
    interactions, items = shop(tmp_path)
    config = shop_config(tmp_path, items)
    dataset = load_dataset(config, str(interactions))
    train_and_publish(dataset, tmp_path / "bundles", config, log=lambda line: None)
    return Engine.load(tmp_path / "bundles"), dataset, tmp_path


def test_side_table_kinds_are_inferred_and_joined_by_id(tmp_path):
    interactions, items = shop(tmp_path)
    ds = data.load(interactions, columns={"user": "customer", "item": "product"})
    table = read_side_table(items, "item", ds.items, "product")
    assert table.kinds == {"category": "categorical", "price": "numeric", "tags": "labels", "title": "title"}
    assert table.n_unmatched == 1  # sku-unsold has no interactions
    at = ds.items.index("sku-7")
    features = table.features
    assert features.columns["category"][at] == "hats" and features.columns["price"][at] == 45.0
    assert sorted(features.labels["tags"]) == features.labels["tags"] and set(features.labels["tags"]) <= set(TAGS)
    joined = with_side_tables(ds, table)
    assert joined.title(at) == "Item number 7" and joined.n_ratings == ds.n_ratings
    # Declared kinds win over inference.
    declared = read_side_table(items, "item", ds.items, "product", kinds={"price": "categorical", "tags": "ignore"})
    assert declared.features.columns["price"].dtype.kind == "U" and "tags" not in declared.features.columns


def test_side_table_errors_name_file_and_line(tmp_path):
    interactions, _ = shop(tmp_path)
    ds = data.load(interactions, columns={"user": "customer", "item": "product"})
    bad = tmp_path / "bad.csv"
    bad.write_text("product,price\nsku-1,10\nsku-2,cheap\n")
    with pytest.raises(DataFormatError, match=r"bad.csv, line 3.*'price' \(numeric\)"):
        read_side_table(bad, "item", ds.items, kinds={"price": "numeric"})
    bad.write_text("product,price\nsku-1,10\nsku-1,12\n")
    with pytest.raises(DataFormatError, match="line 3.*repeats line 2"):
        read_side_table(bad, "item", ds.items)
    bad.write_text("thing,price\nsku-1,10\n")
    with pytest.raises(DataFormatError, match="no item id column"):
        read_side_table(bad, "item", ds.items)


def test_filters_on_any_attribute_come_back_full_and_hold(shop_engine):
    engine, dataset, _ = shop_engine
    attributes = engine.attributes
    assert {"category", "price", "tags"} <= set(attributes.attributes)
    user = dataset.users.ids[0]
    checks = {
        "category": ({"category": ["shoes"]}, lambda i: attributes["category"].vocabulary.index("shoes")),
        "price": ({"price": {"lt": 40, "gte": 20}}, None),
        "tags": ({"tags": {"all": ["red", "sale"]}}, None),
    }
    for name, (filters, _) in checks.items():
        mask = attributes.mask(filters, len(engine.items))
        allowed = set(engine.items.ids[mask].tolist())
        rec = engine.recommend(user, k=5, filters=filters, exclude_seen=False)
        assert len(rec) == min(5, len(allowed)) and set(rec.item_ids) <= allowed, name
    price = attributes["price"].values
    rec = engine.recommend(user, k=5, filters={"price": {"lt": 40, "gte": 20}}, exclude_seen=False)
    assert all(20 <= price[engine.items.index(i)] < 40 for i in rec.item_ids)
    assert "Item number" in rec.titles[0]  # titles come from the side table
    for bad, words in (
        ({"colour": ["red"]}, "unknown filter attribute"),
        ({"price": ["cheap"]}, "numeric"),
        ({"price": {"below": 3}}, "numeric"),
        ({"tags": {"all": ["plaid"]}}, "unknown value"),
        ({"category": {"some": ["hats"]}}, "any"),
    ):
        with pytest.raises(InvalidRequest, match=words):
            engine.recommend(user, filters=bad)


def test_a_new_item_is_described_by_label_names_and_filtered_by_them(shop_engine):
    engine, _, _ = shop_engine
    engine.add_items(
        ["sku-new"], [{"category": "bags", "price": 12, "tags": ["blue", "new"], "title": "New bag"}], persist=False
    )
    at = engine.items.index("sku-new")
    attributes = engine.attributes
    assert attributes["tags"].values[at].tolist() == [int(t in ("blue", "new")) for t in attributes["tags"].vocabulary]
    found = engine.recommend(k=50, filters={"tags": {"all": ["blue", "new"]}, "price": {"lte": 12}})
    assert "sku-new" in found.item_ids
    with pytest.raises(InvalidRequest, match="unknown label"):
        engine.add_items(["sku-odd"], [{"tags": ["plaid"]}], persist=False)


def test_added_items_belong_to_their_dataset_and_keep_labels_by_name(tmp_path, caplog):
    """An item added to one dataset's bundle used to be carried into a bundle built from
    another dataset and its positional genre flags reread against another genre list."""
    interactions, items = shop(tmp_path)
    config = shop_config(tmp_path, items)
    from engine.config import load_dataset

    root = tmp_path / "bundles"
    shop_data = load_dataset(config, str(interactions))
    train_and_publish(shop_data, root, config, log=lambda line: None)
    engine = Engine.load(root)
    flags = [1 if t == "sale" else 0 for t in engine.attributes["tags"].vocabulary]
    engine.add_items(["sku-added"], [{"tags": flags, "category": "hats"}])
    record = json.loads((root / "added_items.jsonl").read_text().splitlines()[-1])
    assert record["features"]["tags"] == ["sale"] and record["dataset"] == shop_data.name
    assert "sku-added" in Engine.load(root).items  # the same dataset serves it
    other = data.make_synthetic(n_users=60, n_items=40, n_ratings=1000, seed=3)
    synthetic_config = load_config(None, ["cf.epochs=2", "towers.epochs=1"])
    with caplog.at_level(logging.WARNING):
        published = train_and_publish(other, root, synthetic_config, log=lambda line: None)
        again = Engine.load(root)
    assert "sku-added" not in again.items
    assert not (published / "tables" / "added_items.jsonl").exists()  # not carried either
    assert "skipped" in caplog.text and shop_data.name in caplog.text


def test_the_cli_trains_indexes_and_evaluates_with_a_side_table(tmp_path, capsys):
    """train-cf / train-towers / build-index / recommend / eval-pipeline all read the
    side table from --item-features (or data.item_features): no step drops it."""
    interactions, items = shop(tmp_path)
    common = ["--set", "data.columns.user=customer", "--set", "data.columns.item=product"]
    common += ["--set", f"paths.models={tmp_path / 'models'}", "--set", f"paths.bundles={tmp_path / 'bundles'}"]
    data_flags = ["--data", str(interactions), "--item-features", str(items)]
    train = ["--split", "none", "--epochs", "2", "--no-progress"]
    assert main(common + ["train-cf", *data_flags, *train]) == 0
    assert main(common + ["train-towers", *data_flags, *train]) == 0
    assert main(common + ["build-index", *data_flags]) == 0
    capsys.readouterr()
    engine = Engine.load(tmp_path / "bundles")
    assert {"category", "price", "tags"} <= set(engine.attributes.attributes)
    assert engine.titles is not None and "Item number" in str(engine.titles[0])
    towers_inputs = {e.name for e in engine.towers.item_pipeline.encoders}
    assert {"category", "price", "tags"} <= towers_inputs  # the towers learned from them
    out = tmp_path / "eval.json"
    command = ["eval-pipeline", *data_flags, "--split", "random", "--peers", "popularity", "--out", str(out)]
    assert main(common + ["--set", "cf.epochs=2", "--set", "towers.epochs=1", *command]) == 0
    assert json.loads(out.read_text())["summary"]["pipeline"]["recall@10"] >= 0


def ratings_csv_directory(tmp_path):
    """A ratings.csv-family directory (movies.csv, no user features) and its pairs."""
    rng = np.random.default_rng(1)
    pairs = sorted({(int(u), int(i)) for u in range(50) for i in rng.zipf(1.4, 12) % 40})
    d = tmp_path / "ml-latest-tiny"
    d.mkdir()
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        + "".join(f"{u},{i},{1 + (u + i) % 5}.0,{1000 + k}\n" for k, (u, i) in enumerate(pairs))
    )
    genres = ("Drama|Comedy", "Action", "Comedy|Romance")
    (d / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(f"{i},Movie {i} (199{i % 10}),{genres[i % 3]}\n" for i in range(40))
    )
    return d, pairs


def renamed_parquet(tmp_path, pairs):
    """A Parquet file of the same interactions under other column names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"who": [f"u{u}" for u, _ in pairs], "what": [f"i{i}" for _, i in pairs], "when": list(range(len(pairs)))}
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    return path


RENAMED = ["data.columns.user=who", "data.columns.item=what", "data.columns.timestamp=when"]


@pytest.mark.parametrize("shape", ["implicit CSV + side table", "ratings.csv directory", "renamed Parquet"])
def test_each_shape_of_data_trains_publishes_serves_and_answers(tmp_path, shape, capsys):
    """tandem publish (train both models, index, publish), then a real `tandem serve`
    process answers over gRPC exactly what the library answers from the same bundle:
    a known user, and a filter on the data's own attribute where it has one."""
    from engine.service.client import Client
    from engine.service.processes import spawn_server

    settings = ["cf.epochs=2", "towers.epochs=1", f"paths.models={tmp_path / 'models'}"]
    filters: dict | None = None
    if shape == "implicit CSV + side table":
        interactions, items = shop(tmp_path)
        source = str(interactions)
        settings += ["data.columns.user=customer", "data.columns.item=product", f"data.item_features={items}"]
        filters = {"category": ["bags"], "price": {"lt": 60}}
    elif shape == "ratings.csv directory":
        directory, _ = ratings_csv_directory(tmp_path)
        source, filters = str(directory), {"genres": {"all": ["Drama", "Comedy"]}}
    else:
        _, pairs = ratings_csv_directory(tmp_path)
        source = str(renamed_parquet(tmp_path, pairs))
        settings += RENAMED
    root = tmp_path / "bundles"
    flags = [word for setting in settings for word in ("--set", setting)]
    assert main(flags + ["publish", "--data", source, "--out", str(root), "--no-progress"]) == 0
    capsys.readouterr()
    library = Engine.load(root)
    user = str(library.users.ids[0])
    requests = [{"user_id": user, "k": 5}] + ([{"user_id": user, "k": 5, "filters": filters}] if filters else [])
    server, port = spawn_server(root, tmp_path / "port", settings=tuple(settings))
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_ready()
            for request in requests:
                got, want = client.recommend(**request), library.recommend(**request)
                assert got.item_ids.tolist() == want.item_ids.tolist() and len(got) > 0, request
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_other_shapes_of_data_through_eval_pipeline(tmp_path, capsys):
    """A ratings.csv-family directory without user features (leave-last-one split) and a
    Parquet file with renamed columns (folds: five seeded per-user random splits)."""
    d, pairs = ratings_csv_directory(tmp_path)
    fast = ["--set", "cf.epochs=2", "--set", "towers.epochs=1"]
    out = tmp_path / "csv.json"
    command = ["eval-pipeline", "--data", str(d), "--split", "last", "--peers", "popularity", "ease"]
    assert main(fast + command + ["--out", str(out)]) == 0
    assert json.loads(out.read_text())["splits"] == ["last1"]
    renamed = [word for setting in RENAMED for word in ("--set", setting)]
    out = tmp_path / "parquet.json"
    command = ["eval-pipeline", "--data", str(renamed_parquet(tmp_path, pairs)), "--split", "folds"]
    command += ["--peers", "popularity", "--n-candidates", "50", "--out", str(out)]
    assert main(fast + renamed + command) == 0
    report = json.loads(out.read_text())
    assert len(report["per_split"]) == 5 and report["splits"][0] == "random0"
    capsys.readouterr()
