"""Alternating least squares for the ``wmse`` objective: CF for implicit feedback in
seconds, without torch.

The cost is :mod:`engine.models.cf`'s ``wmse`` (the objective of implicit ALS), with a
confidence ``c(i, j)`` per observed pair:

    J = 1/2 sum_{r(i,j)=1} c(i,j) (1 - w(j).x(i))^2 + 1/2 sum_{r(i,j)=0} w0 (w(j).x(i))^2
        + lambda/2 (sum_j |w(j)|^2 + sum_i |x(i)|^2)

With ``X`` fixed, ``J`` is quadratic in each ``w(j)`` and its minimiser is the solution of

    (w0 X^T X + sum_{i in S(j)} (c(i,j) - w0) x(i) x(i)^T + lambda I) w(j) = sum_{i in S(j)} c(i,j) x(i)

(``S(j)``: the user's items); the same holds for each ``x(i)`` with ``W`` fixed. ALS
alternates the two exact half-steps, so ``J`` never increases. Each row's ``f x f``
system is built from the user's (item's) own interactions plus the shared Gram matrix and
solved by Cholesky, in a loop compiled with numba over rows in parallel: an iteration
costs ``O(nnz f^2 + (n_users + n_items) f^3)``.

**Attribute prior** (``user_attributes``): where users have attributes (age, occupation,
region, ...), a user's factors are shrunk toward the factors their attributes predict
instead of toward zero: ``lambda/2 |w(j) - m(j)|^2`` replaces ``lambda/2 |w(j)|^2``, with
``m = F A`` and ``A`` the ridge regression of ``W`` on the encoded attributes ``F``
(``A = (F^T F + ridge I)^-1 F^T W``), refitted before each users' half-step. It is a
hierarchical prior fitted by alternation (empirical Bayes): users with few interactions
borrow the taste of users like them, whose factors the data determine better. The
users' half-step stays exact (its right-hand side gains ``lambda m(j)``).

Confidence (:func:`confidence`): ``constant`` (``c = positive_weight`` for every pair,
the Adam trainer's setting), ``linear`` (``1 + alpha * value``) or ``log``
(``1 + alpha * log(1 + value)``), ``value`` being the interaction's rating, count or
strength as the data gives it.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

CONFIDENCES = ("constant", "linear", "log")


def confidence(values: np.ndarray, kind: str, positive_weight: float, alpha: float) -> np.ndarray:
    """The confidence ``c`` of each observed pair from its value (see the module)."""
    values = np.asarray(values, np.float64)
    if kind == "constant":
        return np.full(len(values), positive_weight)
    if kind == "linear":
        return 1.0 + alpha * np.maximum(values, 0.0)
    if kind == "log":
        return 1.0 + alpha * np.log1p(np.maximum(values, 0.0))
    raise ValueError(f"confidence must be one of {CONFIDENCES}, got {kind!r}")


def wmse_sparse_cost(
    W: np.ndarray,
    X: np.ndarray,
    pairs: sp.csr_matrix,
    lambda_: float,
    unobserved_weight: float,
    user_prior: np.ndarray | None = None,
) -> float:
    """``J`` without enumerating the unobserved pairs: ``pairs`` is ``[n_users, n_items]``
    with the confidence of each observed pair. The all-pairs term is
    ``w0/2 sum_kl (W^T W)_kl (X^T X)_kl``, from which the observed pairs' ``w0 p^2`` is
    taken back. ``user_prior``: the users' prior means ``m`` (the attribute prior)."""
    W64, X64 = W.astype(np.float64), X.astype(np.float64)
    coo = pairs.tocoo()
    cost = 0.5 * unobserved_weight * float(np.sum((W64.T @ W64) * (X64.T @ X64)))
    for start in range(0, coo.nnz, 1 << 20):  # observed pairs in chunks: bounded memory
        rows, cols = coo.row[start : start + (1 << 20)], coo.col[start : start + (1 << 20)]
        c = coo.data[start : start + (1 << 20)]
        p = np.einsum("nf,nf->n", W64[rows], X64[cols])
        cost += 0.5 * float(np.sum(c * (1 - p) ** 2 - unobserved_weight * p**2))
    shrunk = W64 if user_prior is None else W64 - user_prior
    return cost + lambda_ / 2 * float(np.sum(shrunk**2) + np.sum(X64**2))


@numba.njit(parallel=True, cache=True)
def _solve_rows(indptr, indices, conf, Y, gram, lambda_, w0, prior, out):  # pragma: no cover (compiled)
    """``out[r]`` = the exact minimiser of row ``r``'s part of ``J`` given ``Y``, its
    regulariser ``lambda/2 |out[r] - prior[r]|^2``."""
    n, f = out.shape
    for r in numba.prange(n):
        A = w0 * gram
        for k in range(f):
            A[k, k] += lambda_
        b = lambda_ * prior[r]
        for p in range(indptr[r], indptr[r + 1]):
            y = Y[indices[p]]
            c = conf[p]
            for k in range(f):
                b[k] += c * y[k]
                scale = (c - w0) * y[k]
                for m in range(f):
                    A[k, m] += scale * y[m]
        out[r] = np.linalg.solve(A, b)


def als_wmse(
    pairs: sp.csr_matrix,
    n_factors: int,
    lambda_: float,
    unobserved_weight: float,
    iterations: int,
    init_std: float = 0.01,
    seed: int = 0,
    on_iteration=None,
    user_attributes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fit ``W`` (``[n_users, f]``) and ``X`` (``[n_items, f]``) to ``pairs`` (``[n_users,
    n_items]`` CSR, the confidence of each observed pair) by ``iterations`` rounds of
    the two exact half-steps. ``user_attributes``: ``[n_users, d]`` encoded attributes
    for the attribute prior (see the module), None for none.
    ``on_iteration(iteration, W, X, prior)`` is called after each round (learning curves,
    progress). Returns float32 ``(W, X, prior)``: ``prior`` the users' prior means ``m``
    of the last users' half-step (None without attributes)."""
    pairs = sp.csr_matrix(pairs, dtype=np.float64)
    pairs.sort_indices()
    by_item = pairs.T.tocsr()
    by_item.sort_indices()
    rng = np.random.default_rng(seed)
    n_users, n_items = pairs.shape
    W = np.zeros((n_users, n_factors))
    X = rng.normal(0.0, init_std, (n_items, n_factors))
    user_prior = np.zeros((n_users, n_factors))
    item_prior = np.zeros((n_items, n_factors))  # items are shrunk toward zero
    for iteration in range(1, iterations + 1):
        if user_attributes is not None:
            user_prior = attribute_prior(user_attributes, W)
        _solve_rows(pairs.indptr, pairs.indices, pairs.data, X, X.T @ X, lambda_, unobserved_weight, user_prior, W)
        _solve_rows(
            by_item.indptr, by_item.indices, by_item.data, W, W.T @ W, lambda_, unobserved_weight, item_prior, X
        )
        if on_iteration is not None:
            on_iteration(iteration, W, X, user_prior if user_attributes is not None else None)
    prior = None if user_attributes is None else user_prior.astype(np.float32)
    return W.astype(np.float32), X.astype(np.float32), prior


ATTRIBUTE_RIDGE = 1.0  # the ridge of the attributes' regression (on one-hot and standardised columns)


def attribute_prior(attributes: np.ndarray, W: np.ndarray, ridge: float = ATTRIBUTE_RIDGE) -> np.ndarray:
    """The users' prior means ``F A``: ``A = (F^T F + ridge I)^-1 F^T W``, the ridge
    regression of the factors ``W`` on the attributes ``F`` (``[n_users, d]``, with an
    intercept column). ``[n_users, f]`` float64, C-contiguous."""
    F = np.asarray(attributes, np.float64)
    A = np.linalg.solve(F.T @ F + ridge * np.eye(F.shape[1]), F.T @ W)
    return np.ascontiguousarray(F @ A)
