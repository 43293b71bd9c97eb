"""ALS for wmse: the same cost as the Adam trainer (checked against the dense NumPy
reference), exact half-steps, and a model that serves like the Adam one."""

import numpy as np
import pytest
import scipy.sparse as sp

from engine import data
from engine.data import from_arrays
from engine.models.als import ATTRIBUTE_RIDGE, als_wmse, attribute_prior, confidence, wmse_sparse_cost
from engine.models.cf import CFModel, train_cf, user_attribute_matrix, wmse_cost


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

    def record(iteration, W, X, prior):
        assert prior is None  # no attributes: shrunk toward zero
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


def test_the_attribute_prior_reaches_a_stationary_point_of_its_cost():
    """With user attributes F, ALS alternates the ridge regression A of W on F with the
    exact half-steps: it descends J' = J (W shrunk toward F A) + lambda ridge/2 |A|^2,
    which never rises, and after enough rounds both gradients (W's through the prior too,
    A being optimal) vanish; the prior it returns is F A of the final W's regression."""
    R, values = problem(seed=3, n_users=40, n_items=25)
    c_matrix = np.where(R == 1, confidence(values, "log", 2.0, 1.5), 0.0)
    pairs = sp.csr_matrix(c_matrix.T)
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 3, 40)
    F = np.hstack([np.eye(3)[groups], rng.normal(size=(40, 1)), np.ones((40, 1))])
    lam, w0 = 0.9, 0.6
    weights = np.where(R == 1, c_matrix, w0)

    def cost(W, X):
        A = np.linalg.solve(F.T @ F + ATTRIBUTE_RIDGE * np.eye(5), F.T @ W)
        fit = 0.5 * np.sum(weights * (R - X @ W.T) ** 2)
        return fit + lam / 2 * (np.sum((W - F @ A) ** 2) + ATTRIBUTE_RIDGE * np.sum(A**2) + np.sum(X**2))

    costs, final = [], {}

    def record(iteration, W, X, prior):
        costs.append(cost(W, X))
        final.update(W=W.copy(), X=X.copy(), prior=prior.copy())

    W32, X32, prior = als_wmse(pairs, 4, lam, w0, 1000, init_std=0.1, seed=0, on_iteration=record, user_attributes=F)
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:]))
    W, X = final["W"], final["X"]
    grad_X = -(weights * (R - X @ W.T)) @ W + lam * X
    grad_W = -(weights * (R - X @ W.T)).T @ X + lam * (W - attribute_prior(F, W))
    assert np.abs(grad_X).max() < 1e-8 and np.abs(grad_W).max() < 1e-6
    # The prior moves the solution: plain ALS on the same data lands elsewhere.
    W_plain = als_wmse(pairs, 4, lam, w0, 1000, init_std=0.1, seed=0)[0]
    np.testing.assert_allclose(prior, final["prior"], rtol=1e-5, atol=1e-6)
    assert np.allclose(W32, W, atol=1e-6) and not np.allclose(W_plain, W32, atol=1e-3)


def test_a_model_with_the_attribute_prior_saves_it_and_folds_its_users_in_toward_it(tmp_path):
    ds = data.make_synthetic(n_users=150, n_items=60, n_ratings=2500, seed=5)
    F = user_attribute_matrix(ds)
    assert F is not None and len(F) == ds.n_users and np.allclose(F[:, -1], 1.0)
    settings = dict(loss="wmse", solver="als", n_features=6, lambda_=5.0, confidence="log", progress=False)
    model = train_cf(ds, attribute_prior=True, als_iterations=400, **settings)
    assert model.user_prior is not None and model.user_prior.shape == model.W.shape
    assert train_cf(ds, als_iterations=2, **settings).user_prior is None
    loaded = CFModel.load(model.save(tmp_path / "cf"))
    np.testing.assert_array_equal(loaded.user_prior, model.user_prior)
    # A training user folded in from their own interactions, toward their prior, lands on
    # their trained vector (converged: the last half-step's X is the final one).
    u = 7
    items = ds.item_idx[ds.user_idx == u]
    values = ds.ratings[ds.user_idx == u]
    folded = loaded.fold_in_indices(items, values, loaded.user_prior[u])
    np.testing.assert_allclose(folded.vector, model.W[u], atol=1e-4)
    plain = loaded.fold_in_indices(items, values)
    assert not np.allclose(plain.vector, model.W[u], atol=1e-3)
    with pytest.raises(ValueError, match="attribute_prior"):
        train_cf(ds, attribute_prior=True, progress=False)  # the Adam solver has no such prior
