"""The demo and `tandem recommend --example` adapt to the data: a new user from the
user features the data has, else from ratings of its most popular items (they once sent
ML-100K demographics, and failed on any data without them)."""

from __future__ import annotations

import numpy as np

from engine import data
from engine.cli import main
from engine.cli.demo import example_new_user
from engine.cli.demo import main as demo
from engine.models.cf import train_cf
from engine.models.towers import train_two_tower
from index_builder import build_bundle


def test_demo_and_example_on_implicit_data_without_user_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pairs = {(f"user-{u}", f"sku-{int(i)}") for u in range(80) for i in rng.zipf(1.3, 12) % 60}
    ds = data.from_arrays([u for u, _ in sorted(pairs)], [i for _, i in sorted(pairs)], name="implicit")
    cf = train_cf(ds, n_features=8, epochs=3, progress=False)
    towers = train_two_tower(ds, objective="softmax", hidden_layers=(16,), output_dim=8, epochs=2, progress=False)
    root = tmp_path / "root"
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    description, request = example_new_user(root)
    assert "ratings" in request and len(request["ratings"]) == 3 and "most popular" in description
    assert demo(["--bundle", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Recommendations for a new user who rated the three most popular items" in out
    assert "the same request as JSON over HTTP" in out and "the same 10 items" in out  # both faces agree
    assert "make web" in out and "http://127.0.0.1:8000/" in out  # how to open the page
    assert main(["recommend", "--bundle", str(root), "--example", "--k", "3"]) == 0
    assert "Recommended for a new user who rated" in capsys.readouterr().out


def test_the_example_new_user_has_the_datas_own_features(small_models, tmp_path):
    ds, cf, towers = small_models
    root = tmp_path / "root"
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    description, request = example_new_user(root)
    features = request["user_features"]
    assert set(features) <= set(ds.user_features.columns) and features and "features" in description
    towers.user_embeddings([features])  # a valid new-user request for this model
