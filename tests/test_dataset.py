import numpy as np
import pytest

from engine.data import Dataset, IdMap, factorize, from_arrays
from engine.errors import UnknownIdError


def test_from_arrays_builds_id_maps_and_parallel_arrays():
    ds = from_arrays(["alice", "bob", "alice"], [10, 20, 20], [5, 3, 4], [1, 2, 3])
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2, 2, 3)
    assert list(ds.users.ids) == ["alice", "bob"]
    # numeric item ids sort numerically and come back as strings
    assert list(ds.items.ids) == ["10", "20"]
    assert ds.user_idx.dtype == np.int32 and ds.ratings.dtype == np.float32
    assert ds.timestamps.dtype == np.int64
    assert ds.users.index("bob") == 1 and ds.items.index(20) == 1
    np.testing.assert_array_equal(ds.items.external([1, 0]), ["20", "10"])


def test_implicit_data_defaults_to_ones():
    ds = from_arrays(["u1", "u2"], ["a", "b"])
    np.testing.assert_array_equal(ds.ratings, [1.0, 1.0])
    np.testing.assert_array_equal(ds.timestamps, [0, 0])
    assert ds.describe()["implicit"] is True


def test_csr_views_have_fixed_orientation():
    ds = from_arrays(["u1", "u1", "u2"], ["a", "b", "b"], [1, 2, 3])
    ui = ds.user_items()
    iu = ds.item_users()
    assert ui.shape == (2, 2) and iu.shape == (2, 2)
    np.testing.assert_array_equal(ui.toarray(), [[1, 2], [0, 3]])
    np.testing.assert_array_equal(iu.toarray(), ui.toarray().T)


def test_duplicate_pairs_keep_the_latest_interaction():
    ds = from_arrays(["u", "u", "u"], ["a", "a", "b"], [1, 5, 2], timestamps=[20, 10, 5])
    assert ds.n_ratings == 2
    assert ds.user_items()[0, 0] == 1.0  # timestamp 20 beats timestamp 10


def test_unknown_ids_raise_a_keyerror_that_names_them():
    ds = from_arrays(["u"], ["a"])
    with pytest.raises(UnknownIdError, match="unknown user id 'nobody'"):
        ds.users.index("nobody")
    with pytest.raises(KeyError):
        ds.items.indices(["a", "zzz"])
    assert "a" in ds.items and "zzz" not in ds.items


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        from_arrays(["u", "v"], ["a"])
    with pytest.raises(ValueError, match="NaN"):
        from_arrays(["u"], ["a"], [float("nan")])
    with pytest.raises(ValueError, match="not unique"):
        IdMap(["x", "x"])
    with pytest.raises(ValueError, match="out of range"):
        Dataset(np.array([3]), np.array([0]), np.array([1.0]), np.array([0]), IdMap(["a"]), IdMap(["b"]))


def test_factorize_sorts_numeric_ids_numerically_and_strings_lexically():
    codes, uniques = factorize(np.array(["10", "2", "10", "1"]))
    assert list(uniques) == ["1", "2", "10"]
    np.testing.assert_array_equal(codes, [2, 1, 2, 0])
    codes, uniques = factorize(np.array(["b", "a", "b"]))
    assert list(uniques) == ["a", "b"] and list(codes) == [1, 0, 1]


def test_describe_reports_hand_computed_statistics():
    ds = from_arrays(["u1", "u1", "u2", "u3"], ["a", "b", "a", "a"], [4, 2, 5, 3])
    d = ds.describe(top=2)
    assert (d["n_users"], d["n_items"], d["n_ratings"]) == (3, 2, 4)
    assert d["sparsity"] == pytest.approx(1 - 4 / 6)
    assert d["rating_values"] == [2, 3, 4, 5] and d["rating_mean"] == pytest.approx(3.5)
    assert d["top_items"][0] == {"item_id": "a", "title": "a", "n_ratings": 3, "mean_rating": 4.0}
    assert d["ratings_per_user"] == {"min": 1, "median": 1.0, "max": 2, "mean": pytest.approx(4 / 3)}


def test_subset_shares_id_maps():
    ds = from_arrays(["u1", "u2", "u3"], ["a", "b", "c"])
    sub = ds.subset(np.array([True, False, False]))
    assert sub.n_ratings == 1 and sub.n_users == 3 and sub.users is ds.users
