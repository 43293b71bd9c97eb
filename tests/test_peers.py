"""The evaluation peers: EASE against its definition, and every peer through the same
metrics as the pipeline."""

import numpy as np
import pytest
import scipy.sparse as sp

from engine import data
from engine.evaluation import peers


def test_ease_weights_are_the_ridge_regression_of_each_item_on_the_others():
    """EASE's closed form (B = I - P / diag(P)) equals, column by column, the ridge
    regression of item j's column on every other item's column (the zero-diagonal
    constraint), solved directly in NumPy."""
    rng = np.random.default_rng(0)
    x = (rng.random((30, 8)) < 0.3).astype(np.float64)
    lam = 2.5
    weights = peers.ease_weights(sp.csr_matrix(x), lam)
    assert np.allclose(np.diag(weights), 0)
    for j in range(8):
        others = [c for c in range(8) if c != j]
        a = x[:, others]
        expected = np.linalg.solve(a.T @ a + lam * np.eye(7), a.T @ x[:, j])
        np.testing.assert_allclose(weights[others, j], expected, rtol=1e-8, atol=1e-10)


def test_peers_rank_unseen_items_and_beat_nothing_for_free():
    ds = data.make_synthetic(n_users=300, n_items=120, n_ratings=6000, seed=2)
    train, test = data.temporal_split(ds, 0.2)
    pop = peers.popularity(train, test, 10)
    ease = peers.ease(train, test, 10, lambdas=(10.0, 100.0))
    assert ease["params"]["lambda"] in (10.0, 100.0) and ease["grid_size"] == 2
    # The synthetic data have structure that EASE finds and popularity cannot.
    assert ease["ndcg@10"] > pop["ndcg@10"] > 0
    assert "skipped" in peers.ease(train, test, 10, max_items=100)


def test_implicit_als_is_the_best_of_its_grid():
    pytest.importorskip("implicit", reason="implicit ALS needs the bench extra (make install-bench)")
    ds = data.make_synthetic(n_users=300, n_items=120, n_ratings=6000, seed=2)
    train, test = data.temporal_split(ds, 0.2)
    best = peers.implicit_als(train, test, 10, factors=(8,), regularization=(0.1, 10.0), iterations=3)
    assert best["grid_size"] == 2 and best["params"]["factors"] == 8 and 0 < best["recall@10"] <= 1


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["fewer users (dual form)", "fewer items (B)"])
def test_ease_scores_equal_the_history_times_the_weights(shape):
    """Both forms of the scores (Woodbury's users x users inverse when users are fewer,
    B itself otherwise) equal X[users] @ B of the definition."""
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random(shape) < 0.25).astype(np.float64))
    lam = 1.5
    expected = x.toarray() @ peers.ease_weights(x, lam)
    users = np.array([3, 0, 7])
    got = peers.ease_scores(x, lam, block=5)(users)  # blocks of 5 items: several, one ragged
    assert got.shape == (3, shape[1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[users], rtol=1e-4, atol=1e-5)
