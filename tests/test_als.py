"""ALS for wmse: the same cost as the Adam trainer (checked against the dense NumPy
reference), exact half-steps, and a model that serves like the Adam one."""

import numpy as np
import pytest
import scipy.sparse as sp

from engine import data
from engine.data import from_arrays
from engine.models.als import als_wmse, confidence, wmse_sparse_cost
from engine.models.cf import train_cf, wmse_cost


def problem(seed=0, n_users=30, n_items=20, density=0.25):
    rng = np.random.default_rng(seed)
    R = (rng.random((n_items, n_users)) < density).astype(float)  # the reference's [items, users] mask
    values = rng.integers(1, 6, size=R.shape).astype(float) * R  # e.g. counts
    return R, values


def reference_cost(X, W, R, c_matrix, lam, w0):
    """wmse_cost with a confidence per observed pair (dense, every pair enumerated)."""
    return wmse_cost(X, W, R, lam, np.where(R == 1, c_matrix, 0.0), w0)


@pytest.mark.parametrize("kind", ["constant", "linear", "log"])
def test_the_sparse_cost_equals_the_dense_reference(kind):
    R, values = problem()
    c = confidence(values[R == 1], kind, positive_weight=3.0, alpha=0.8)
    c_matrix = np.zeros_like(R)
    c_matrix[R == 1] = c
    rng = np.random.default_rng(1)
    X, W = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    pairs = sp.csr_matrix(c_matrix.T)  # [users, items]
    assert wmse_sparse_cost(W, X, pairs, 0.7, 0.5) == pytest.approx(reference_cost(X, W, R, c_matrix, 0.7, 0.5))


def test_each_half_step_is_exact_and_the_cost_never_rises():
    R, values = problem(seed=2)
    c_matrix = np.where(R == 1, confidence(values, "log", 2.0, 1.5), 0.0)
    pairs = sp.csr_matrix(c_matrix.T)
    lam, w0 = 0.9, 0.6
    costs = []
    final = {}

    def record(iteration, W, X):
        costs.append(reference_cost(X, W, R, c_matrix, lam, w0))
        final.update(W=W.copy(), X=X.copy())

    als_wmse(pairs, 5, lam, w0, iterations=8, init_std=0.1, seed=0, on_iteration=record)
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:])), costs
    # The last half-step solved every item exactly: the cost's gradient in X vanishes.
    X, W = final["X"], final["W"]
    weights = np.where(R == 1, c_matrix, w0)
    grad_X = -(weights * (R - X @ W.T)) @ W + lam * X
    assert np.abs(grad_X).max() < 1e-8


def test_adam_and_als_minimise_the_same_cost():
    """The Adam trainer (the mission's reference) and ALS, on the same wmse cost: ALS
    reaches it in a few iterations, Adam after many steps, and the two costs agree."""
    ds = data.make_synthetic(n_users=200, n_items=120, n_ratings=3000, seed=4)
    settings = dict(loss="wmse", n_features=8, lambda_=5.0, positive_weight=3.0, init_std=0.01, progress=False)
    als = train_cf(ds, solver="als", als_iterations=30, **settings)
    adam = train_cf(ds, learning_rate=0.02, epochs=1500, batch_size=1 << 30, validation_fraction=0.0, **settings)
    R = ds.user_items().toarray().T > 0
    cost = {
        name: wmse_cost(m.X.astype(np.float64), m.W.astype(np.float64), R.astype(float), 5.0, 3.0, 1.0)
        for name, m in (("als", als), ("adam", adam))
    }
    assert cost["adam"] == pytest.approx(cost["als"], rel=1e-3), cost
    zero = wmse_cost(np.zeros_like(als.X), np.zeros_like(als.W), R.astype(float), 5.0, 3.0, 1.0)
    assert cost["als"] < 0.6 * zero  # both moved far from the start, to the same place


def test_an_als_model_serves_and_folds_in_with_confidence():
    users = [f"u{u}" for u in range(40) for _ in range(5)]
    rng = np.random.default_rng(0)
    items = [f"i{int(i)}" for i in rng.integers(0, 30, 200)]
    counts = rng.integers(1, 20, 200).astype(float)  # implicit strengths: play counts
    ds = from_arrays(users, items, counts)
    model = train_cf(ds, loss="wmse", solver="als", confidence="log", alpha=2.0, n_features=6, progress=False)
    assert model.metrics["fit_seconds"] >= 0 and len(model.recommend("u1", k=5)) == 5
    folded = model.fold_in(["i1", "i2"], [10.0, 1.0])
    X = model.X.astype(np.float64)
    c = confidence(np.array([10.0, 1.0]), "log", 2.0, 2.0)
    S = model.items.indices(["i1", "i2"])
    weight, target = np.full(len(X), 1.0), np.zeros(len(X))
    weight[S], target[S] = c, 1.0
    w = folded.vector.astype(np.float64)
    gradient = -(weight * (target - X @ w)) @ X + model.config.lambda_ * w
    assert np.abs(gradient).max() < 1e-3
    with pytest.raises(ValueError, match="solver 'als'"):
        train_cf(ds, solver="als", loss="mse", progress=False)
