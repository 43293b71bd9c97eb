"""User-partitioned interactions on disk (engine/data/shards.py, `tandem data shard`):
every part together is the data again, a rank's parts hold exactly its users, and a
damaged or mismatched shard set is refused with the file named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine import data
from engine.data.shards import part_file, read_shards, write_shards
from engine.errors import ConfigError, DataFormatError


@pytest.fixture
def dataset():
    ds = data.make_synthetic(n_users=60, n_items=40, n_ratings=900, seed=3)
    assert ds.item_features is not None and ds.user_features is not None  # the tables travel too
    return ds


def pairs(ds) -> set:
    return set(zip(ds.users.external(ds.user_idx), ds.items.external(ds.item_idx), ds.ratings, ds.timestamps))


def test_every_part_together_is_the_data(tmp_path, dataset):
    manifest = json.loads(write_shards(dataset, tmp_path / "s", parts=4).read_text())
    whole = data.load(tmp_path / "s")  # a sharded directory is a data source like any other
    assert pairs(whole) == pairs(dataset) and whole.n_ratings == dataset.n_ratings
    assert whole.users == dataset.users and whole.items == dataset.items
    assert whole.fingerprint() == manifest["fingerprint"] and whole.shard_of is None
    assert sum(manifest["part_ratings"]) == dataset.n_ratings
    for name, column in dataset.item_features.columns.items():
        np.testing.assert_array_equal(whole.item_features.columns[name], column)
    assert whole.item_features.labels == dataset.item_features.labels
    assert set(whole.user_features.columns) == set(dataset.user_features.columns)


def test_a_rank_reads_exactly_its_users(tmp_path, dataset):
    write_shards(dataset, tmp_path / "s", parts=4)
    ranks = [read_shards(tmp_path / "s", rank, 2) for rank in range(2)]
    for rank, part in enumerate(ranks):
        assert (part.user_idx % 2 == rank).all()
        assert part.users == dataset.users  # the whole id maps: indices mean the same on every rank
        assert part.shard_of["n_ratings"] == dataset.n_ratings
    assert pairs(ranks[0]) | pairs(ranks[1]) == pairs(dataset)
    assert ranks[0].n_ratings + ranks[1].n_ratings == dataset.n_ratings
    expected = dataset.subset(dataset.user_idx % 2 == 1)
    assert pairs(ranks[1]) == pairs(expected)


def test_parts_that_processes_cannot_share_are_refused(tmp_path, dataset):
    write_shards(dataset, tmp_path / "s", parts=4)
    with pytest.raises(DataFormatError, match="4 parts cannot be shared by 3 processes"):
        read_shards(tmp_path / "s", 0, 3)


def test_a_damaged_part_is_named(tmp_path, dataset):
    write_shards(dataset, tmp_path / "s", parts=2)
    part_file(tmp_path / "s", 1).write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="part-00001.parquet"):
        data.load(tmp_path / "s")
    # A part from another shard set (other users) is caught as well.
    write_shards(dataset, tmp_path / "t", parts=2)
    part_file(tmp_path / "t", 0).write_bytes(part_file(tmp_path / "t", 1).read_bytes())
    with pytest.raises(DataFormatError, match="part-00000.parquet"):
        data.load(tmp_path / "t")


def test_existing_shards_are_not_overwritten(tmp_path, dataset):
    write_shards(dataset, tmp_path / "s", parts=2)
    before = part_file(tmp_path / "s", 0).read_bytes()
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(dataset.subset(np.arange(10)), tmp_path / "s", parts=2)
    assert part_file(tmp_path / "s", 0).read_bytes() == before


def test_tandem_data_shard_writes_and_says_how_to_train(tmp_path):
    settings = ["--set", "data.synthetic.n_users=50", "--set", "data.synthetic.n_items=30"]
    settings += ["--set", "data.synthetic.n_ratings=600"]
    command = [sys.executable, "-m", "engine", *settings, "data", "shard", "synthetic", "--parts", "2"]
    done = subprocess.run([*command, "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 600 ratings of 50 users in 2 parts" in done.stdout and "--distributed" in done.stdout
    assert data.load(tmp_path / "s").n_ratings == 600
    again = subprocess.run([*command, "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already holds shards" in again.stderr
