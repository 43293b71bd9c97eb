import numpy as np
import pytest

from engine import data


def test_deterministic_for_a_seed():
    a = data.make_synthetic(n_users=300, n_items=200, n_ratings=5000, seed=7)
    b = data.make_synthetic(n_users=300, n_items=200, n_ratings=5000, seed=7)
    c = data.make_synthetic(n_users=300, n_items=200, n_ratings=5000, seed=8)
    for name in ("user_idx", "item_idx", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.item_idx, c.item_idx)


def test_sizes_features_and_distinct_pairs():
    ds = data.make_synthetic(n_users=400, n_items=300, n_ratings=8000, seed=0)
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (400, 300, 8000)
    keys = ds.user_idx.astype(np.int64) * ds.n_items + ds.item_idx
    assert len(np.unique(keys)) == ds.n_ratings
    assert set(np.unique(ds.ratings)) <= {1, 2, 3, 4, 5}
    assert set(ds.user_features.columns) == {"age", "gender", "occupation", "zip_code"}
    assert ds.item_features.columns["genres"].shape == (300, 12)
    assert (ds.item_features.columns["genres"].sum(1) >= 1).all()


def test_popularity_and_activity_are_skewed():
    ds = data.make_synthetic(n_users=2000, n_items=1000, n_ratings=50_000, seed=0)
    items = np.sort(ds.item_counts())[::-1]
    users = np.sort(ds.user_counts())[::-1]
    # the top 10% of items and of users hold far more than 10% of the interactions
    assert items[:100].sum() / ds.n_ratings > 0.4
    assert users[:200].sum() / ds.n_ratings > 0.25


def test_content_signal_exists():
    """Items sharing a genre are rated alike by a segment more than random pairs are:
    segment x genre mean ratings vary far more than noise would allow."""
    ds = data.make_synthetic(n_users=2000, n_items=500, n_ratings=60_000, seed=0)
    seg = np.unique(ds.user_features.columns["occupation"], return_inverse=True)[1][ds.user_idx]
    genre = ds.item_features.columns["genres"].argmax(1)[ds.item_idx]
    cell = seg * 100 + genre
    sums = np.bincount(cell, ds.ratings)
    counts = np.bincount(cell)
    means = sums[counts >= 50] / counts[counts >= 50]
    assert means.std() > 0.25


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_users"):
        data.make_synthetic(n_users=0)
    with pytest.raises(ValueError, match="too dense"):
        data.make_synthetic(n_users=10, n_items=10, n_ratings=80)
