import numpy as np
import pytest

from engine import data
from engine.data import from_arrays


def toy():
    users = ["u1"] * 4 + ["u2"] * 2 + ["u3"]
    items = ["a", "b", "c", "d", "a", "b", "c"]
    return from_arrays(users, items, [5, 4, 3, 2, 1, 2, 3], [10, 40, 20, 30, 5, 1, 7])


def test_random_split_is_seeded_disjoint_and_complete():
    ds = data.make_synthetic(n_users=100, n_items=50, n_ratings=1000, seed=1)
    a = data.random_split(ds, 0.25, seed=3)
    b = data.random_split(ds, 0.25, seed=3)
    assert a.test.n_ratings == 250 and a.train.n_ratings == 750
    np.testing.assert_array_equal(a.test.item_idx, b.test.item_idx)
    train_keys = set(zip(a.train.user_idx.tolist(), a.train.item_idx.tolist()))
    test_keys = set(zip(a.test.user_idx.tolist(), a.test.item_idx.tolist()))
    assert not train_keys & test_keys and len(train_keys | test_keys) == 1000
    assert a.train.users is ds.users  # shared id maps keep indices aligned
    with pytest.raises(ValueError):
        data.random_split(ds, 1.5)


def test_leave_last_n_takes_latest_per_user():
    ds = toy()
    train, test = data.leave_last_n(ds, n=1)
    got = sorted(zip(ds.users.external(test.user_idx), ds.items.external(test.item_idx)))
    # u1's latest is b (t=40), u2's latest is a (t=5); u3 has one rating and stays in train
    assert got == [("u1", "b"), ("u2", "a")]
    assert train.n_ratings == 5
    train2, test2 = data.leave_last_n(ds, n=2)
    got2 = sorted(zip(ds.users.external(test2.user_idx), ds.items.external(test2.item_idx)))
    assert got2 == [("u1", "b"), ("u1", "d")]  # u2 has only 2 ratings: stays whole


def test_item_cold_start_holds_out_whole_items():
    ds = data.make_synthetic(n_users=200, n_items=100, n_ratings=3000, seed=2)
    split = data.item_cold_start_split(ds, 0.2, seed=0)
    cold = set(split.cold_items.tolist())
    rated = int((ds.item_counts() > 0).sum())
    assert len(cold) == round(rated * 0.2)
    assert set(np.unique(split.test.item_idx).tolist()) == cold
    assert not cold & set(split.train.item_idx.tolist())
    assert split.train.n_ratings + split.test.n_ratings == ds.n_ratings


def test_predefined_folds(ml100k_path):
    split = data.predefined_split(ml100k_path, fold=1)
    assert (split.train.n_ratings, split.test.n_ratings) == (80_000, 20_000)
    assert split.train.n_users == 943 and split.test.n_items == 1682
    full = data.load(ml100k_path)
    # the same (user, item, rating) triples as in u.data, indexed by the full id maps
    u, i = full.users.index("1"), full.items.index("1")
    both = split.train.user_items() + split.test.user_items()
    assert both[u, i] == full.user_items()[u, i]
    with pytest.raises(ValueError, match="fold"):
        data.predefined_split(ml100k_path, fold=9)


def test_temporal_split_holds_out_each_users_latest_fraction():
    """Hand-computed: at 0.5, u1 (4 interactions) gives its 2 latest (times 40, 30: b,
    d), u2 (2) its latest (a at time 5), u3 (1) nothing (floor(0.5) = 0)."""
    ds = toy()
    train, test = data.temporal_split(ds, 0.5)
    held = {(ds.users.ids[u], ds.items.ids[i]) for u, i in zip(test.user_idx, test.item_idx)}
    assert held == {("u1", "b"), ("u1", "d"), ("u2", "a")}
    assert train.n_ratings == 4
    with pytest.raises(ValueError, match="test_fraction"):
        data.temporal_split(ds, 0.0)


def test_per_user_random_split_takes_that_share_of_every_user():
    ds = data.make_synthetic(n_users=100, n_items=50, n_ratings=2000, seed=1)
    split = data.random_split(ds, 0.2, seed=4, per_user=True)
    counts, test_counts = ds.user_counts(), split.test.user_counts()
    np.testing.assert_array_equal(test_counts, np.floor(counts * 0.2 + 1e-9).astype(int))
    again = data.random_split(ds, 0.2, seed=4, per_user=True)
    np.testing.assert_array_equal(split.test.item_idx, again.test.item_idx)
    other = data.random_split(ds, 0.2, seed=5, per_user=True)
    assert not np.array_equal(split.test.item_idx, other.test.item_idx)


def test_a_users_per_user_random_split_depends_on_their_interactions_alone():
    """A rank of a distributed run holding some users splits them as the whole data's
    split does: the same held-out pairs for those users."""
    ds = data.make_synthetic(n_users=100, n_items=80, n_ratings=3000, seed=0)
    whole = data.random_split(ds, 0.2, seed=3, per_user=True).test
    odd_users = ds.subset(ds.user_idx % 2 == 1)
    part = data.random_split(odd_users, 0.2, seed=3, per_user=True).test
    in_part = whole.user_idx % 2 == 1
    expected = set(zip(whole.user_idx[in_part], whole.item_idx[in_part]))
    assert set(zip(part.user_idx, part.item_idx)) == expected and len(expected) > 200
