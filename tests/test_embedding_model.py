"""The EmbeddingModel contract (engine.models.embedding) for every model: the inner
product of its retrieval vectors, plus the user bias, is the model's own score, and
cold start from features works exactly where the model says it does."""

from __future__ import annotations

import numpy as np
import pytest

from engine.models.embedding import EmbeddingModel


@pytest.mark.parametrize("which", ["cf", "towers"])
def test_retrieval_vectors_score_as_the_model(small_models, which):
    ds, cf, towers = small_models
    model = {"cf": cf, "towers": towers}[which]
    assert isinstance(model, EmbeddingModel) and model.name == which
    users = np.array([0, 7, 42])
    items = model.retrieval_item_vectors()
    queries = model.retrieval_user_vectors(users)
    assert items.dtype == queries.dtype == np.float32 and items.shape[1] == queries.shape[1]
    assert items.shape[0] == ds.n_items and queries.shape[0] == len(users)
    got = queries @ items.T + model.user_biases(users)[:, None]
    every = np.arange(ds.n_items)
    if which == "cf":
        want = np.stack([cf.predict_indices(np.full(ds.n_items, u), every) for u in users])
    else:
        want = towers.scores(towers.user_vectors_at(users))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cold_start_from_features_where_the_model_has_them(small_models):
    _, cf, towers = small_models
    assert towers.embeds_from_features and not cf.embeds_from_features
    features = [{"age": 30.0}]
    np.testing.assert_array_equal(towers.cold_user_vectors(features), towers.user_embeddings(features))
    np.testing.assert_array_equal(
        towers.cold_item_vectors([{"year": 2000.0}]), towers.item_embeddings([{"year": 2000.0}])
    )
    with pytest.raises(NotImplementedError, match="fold_in"):
        cf.cold_user_vectors(features)
