import numpy as np
import pytest

from engine import data
from engine.models.features import fit_item_pipeline, fit_user_pipeline


def toy():
    ds = data.from_arrays(["a", "a", "b", "c"], ["x", "y", "x", "z"], [5, 1, 3, 4])
    users = data.FeatureTable(
        {
            "age": np.array([20, np.nan, 40], np.float32),
            "occupation": np.array(["writer", "artist", ""]),
            "zip_code": np.array(["94043", "10001", "E2A"]),
        }
    )
    items = data.FeatureTable(
        {"genres": np.array([[1, 0], [0, 1], [1, 1]], np.uint8), "year": np.array([1990, 2000, np.nan], np.float32)},
        {"genres": ["Action", "Drama"]},
    )
    return data.Dataset(
        ds.user_idx,
        ds.item_idx,
        ds.ratings,
        ds.timestamps,
        ds.users,
        ds.items,
        user_features=users,
        item_features=items,
    )


def test_user_pipeline_hand_computed():
    ds = toy()
    p = fit_user_pipeline(ds)
    names = p.output_names
    x = p.transform_table(ds.user_features, np.arange(3))
    col = {n: x[:, k] for k, n in enumerate(names)}
    # age: mean 30, std 10 over known values; the missing one is 0 with its flag set
    np.testing.assert_allclose(col["age"], [-1, 0, 1])
    np.testing.assert_allclose(col["age_missing"], [0, 1, 0])
    # occupation: vocabulary from training, "" goes to <unknown>
    np.testing.assert_allclose(col["occupation=writer"], [1, 0, 0])
    np.testing.assert_allclose(col["occupation=<unknown>"], [0, 0, 1])
    # zip region is the first character
    np.testing.assert_allclose(col["zip_code=9"], [1, 0, 0])
    # history: global mean 3.25; user a rated 5 and 1 -> centred average -0.25, count 2
    np.testing.assert_allclose(col["avg_rating"], [-0.25, -0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(col["log_count"], np.log1p([2, 1, 1]), rtol=1e-6)
    # per genre: a rated x (Action, 5) and y (Drama, 1)
    np.testing.assert_allclose(col["avg_rating[Action]"], [1.75, -0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(col["avg_rating[Drama]"], [-2.25, 0, 0.75], atol=1e-6)


def test_cold_and_unknown_values():
    ds = toy()
    p = fit_user_pipeline(ds)
    x = p.transform_dicts([{"age": 30, "occupation": "astronaut", "zip_code": "7"}, {}])
    col = {n: x[:, k] for k, n in enumerate(p.output_names)}
    np.testing.assert_allclose(col["occupation=<unknown>"], [1, 1])
    np.testing.assert_allclose(col["age_missing"], [0, 1])
    np.testing.assert_allclose(col["zip_code=<unknown>"], [1, 1])
    np.testing.assert_allclose(col["log_count"], [0, 0])  # no history
    with pytest.raises(ValueError, match="unknown user feature"):
        p.transform_dicts([{"shoe_size": 3}])
    with pytest.raises(ValueError, match="finite"):
        p.transform_dicts([{"age": float("nan")}])


def test_item_pipeline_and_unrated_items():
    ds = toy()
    train = ds.subset(ds.item_idx != ds.items.index("z"))  # z never rated in training
    p = fit_item_pipeline(train)
    x = p.transform_table(ds.item_features, np.arange(3))
    col = {n: x[:, k] for k, n in enumerate(p.output_names)}
    np.testing.assert_allclose(col["genres=Drama"], [0, 1, 1])
    np.testing.assert_allclose(col["year"], [-1, 1, 0])  # mean 1995, std 5 over rated items
    np.testing.assert_allclose(col["year_missing"], [0, 0, 1])
    np.testing.assert_allclose(col["log_count"], np.log1p([2, 1, 0]), rtol=1e-6)
