"""Collaborative filtering: the mission's matrix factorisation, trained with Adam.

Notation (``mission.md``): item ``i`` has a vector ``x(i)``, user ``j`` a vector ``w(j)``
and a bias ``b(j)``; the prediction is ``w(j) . x(i) + b(j)`` and the cost is

    J = 1/2 sum_{r(i,j)=1} (w(j).x(i) + b(j) - y(i,j))^2
        + lambda/2 sum_j |w(j)|^2 + lambda/2 sum_i |x(i)|^2          (b not regularised)

Two parts live here:

- the dense NumPy **reference** :func:`cofi_cost` / :func:`cofi_gradients`, used only by
  tests to check the training path;
- the sparse torch **trainer** :func:`train_cf`, returning a :class:`CFModel`. It never
  builds a dense ratings matrix: minibatches are drawn from the COO arrays. The minibatch
  objective is ``J / N`` split over batches — each batch carries its squared errors
  divided by the batch size plus ``lambda / (2N)`` times the full L2 terms — so an epoch's
  gradient steps follow exactly the mission's cost (:func:`sparse_cost` checks it).

Optional extras (configurable): an item bias ``c(i)`` and a global mean ``mu`` added to
the prediction (not regularised, like ``b``); for ``mse``, **history factors** (SVD++,
Koren 2008): a user's vector is ``w(j) + |N(j)|^-1/2 sum_{i in N(j)} y(i)`` over the
items ``N(j)`` the user rated, so that *which* items a user rated informs their taste,
with ``history_lambda/2 sum_i |y(i)|^2`` added to the cost (:func:`history_cost` is the
reference; the trained model stores the sum folded into ``W``); per-item mean normalisation (subtract each
item's training mean before training, add it back when predicting — then a user with no
ratings is predicted the item means); a ``bce`` loss with sampled negatives for
binary data; and ``wmse``, the weighted squared error over *all* user x item pairs for
implicit feedback (the objective of implicit ALS, here minimised with Adam):

    J = 1/2 sum_{r(i,j)=1} c (1 - w(j).x(i))^2 + 1/2 sum_{r(i,j)=0} w0 (w(j).x(i))^2
        + lambda/2 (sum_j |w(j)|^2 + sum_i |x(i)|^2)

whose sum over the unobserved pairs never enumerates them: it is the sum over all pairs,
``w0/2 sum_kl (W^T W)_kl (X^T X)_kl``, minus the observed pairs' share — cost
``O((n_users + n_items) f^2)``, no dense matrix (:func:`wmse_cost` is the reference).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from engine.data import Dataset, IdMap
from engine.errors import TandemError
from engine.models import distributed
from engine.models.als import als_wmse, confidence, wmse_sparse_cost
from engine.models.artifacts import read_model_dir, write_model_dir
from engine.models.features import fit_user_pipeline
from engine.models.training import EarlyStopping, LearningCurve, require_torch, resolve_device, seed_everything
from engine.results import SQUARED_DISTANCE, Recommendations
from engine.settings import from_known_settings
from engine.topk import top_k_desc, top_k_rows

FORMAT_VERSION = 1


# ---------------------------------------------------------------- reference
def cofi_cost(X: np.ndarray, W: np.ndarray, b: np.ndarray, Y: np.ndarray, R: np.ndarray, lambda_: float) -> float:
    """The mission's cost on dense matrices (reference only).

    Args:
        X: ``[n_items, n_features]`` item vectors.
        W: ``[n_users, n_features]`` user vectors.
        b: ``[1, n_users]`` user biases.
        Y: ``[n_items, n_users]`` ratings (any value where ``R`` is 0).
        R: ``[n_items, n_users]`` 1 where rated, else 0.
        lambda_: L2 strength.
    """
    E = (X @ W.T + b - Y) * R
    return float(0.5 * np.sum(E**2) + lambda_ / 2 * (np.sum(W**2) + np.sum(X**2)))


def cofi_gradients(
    X: np.ndarray, W: np.ndarray, b: np.ndarray, Y: np.ndarray, R: np.ndarray, lambda_: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand-derived gradients of :func:`cofi_cost`: ``(dX [n_items, f], dW [n_users, f],
    db [1, n_users])``. With ``E = (X W^T + b - Y) * R``: ``dX = E W + lambda X``,
    ``dW = E^T X + lambda W``, ``db = sum_i E``."""
    E = (X @ W.T + b - Y) * R
    return E @ W + lambda_ * X, E.T @ X + lambda_ * W, E.sum(axis=0, keepdims=True)


def history_cost(
    X: np.ndarray,
    W: np.ndarray,
    Yh: np.ndarray,
    b: np.ndarray,
    Y: np.ndarray,
    R: np.ndarray,
    lambda_: float,
    history_lambda: float,
) -> float:
    """:func:`cofi_cost` with history factors ``Yh [n_items, f]`` (reference only): user
    ``j``'s vector is ``w(j) + z(j)``, ``z = N Yh`` with ``N [n_users, n_items]`` the rated
    flags ``R^T`` scaled by ``|N(j)|^-1/2`` per row, plus ``history_lambda/2 |Yh|^2``."""
    N = _history_matrix(R)
    E = (X @ (W + N @ Yh).T + b - Y) * R
    return float(0.5 * np.sum(E**2) + lambda_ / 2 * (np.sum(W**2) + np.sum(X**2)) + history_lambda / 2 * np.sum(Yh**2))


def history_gradients(
    X: np.ndarray,
    W: np.ndarray,
    Yh: np.ndarray,
    b: np.ndarray,
    Y: np.ndarray,
    R: np.ndarray,
    lambda_: float,
    history_lambda: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hand-derived gradients of :func:`history_cost`: ``(dX, dW, dYh, db)``. With
    ``U = W + N Yh`` and ``E = (X U^T + b - Y) * R``: ``dX = E U + lambda X``,
    ``dW = E^T X + lambda W``, ``dYh = N^T (E^T X) + history_lambda Yh``,
    ``db = sum_i E``."""
    N = _history_matrix(R)
    E = (X @ (W + N @ Yh).T + b - Y) * R
    user_side = E.T @ X  # dJ/dU, data part
    return (
        E @ (W + N @ Yh) + lambda_ * X,
        user_side + lambda_ * W,
        N.T @ user_side + history_lambda * Yh,
        E.sum(axis=0, keepdims=True),
    )


def _history_matrix(R: np.ndarray) -> np.ndarray:
    """``N [n_users, n_items]``: each user's rated flags times ``|N(j)|^-1/2``."""
    counts = R.sum(axis=0)
    return R.T / np.sqrt(np.maximum(counts, 1))[:, None]


# ------------------------------------------------------------------- config
@dataclass
class CFConfig:
    """Training settings of :func:`train_cf` (also the ``[cf]`` section of tandem.toml).

    Defaults are the ones that meet benchmark B1 on ML-100K (``make bench-cf``).
    """

    n_features: int = 64
    lambda_: float = 12.0
    learning_rate: float = 0.002
    epochs: int = 100
    batch_size: int = 1024
    loss: str = "mse"  # "mse" ratings; "bce" binary with sampled negatives; "wmse" implicit, all pairs
    item_bias: bool = True
    global_mean: bool = True
    mean_normalization: bool = False
    # mean_normalization: each item's mean is shrunk toward the global mean as if it had
    # this many more ratings at the global mean, so that an item with one 5-star rating
    # does not top the predictions of a user with no ratings.
    mean_shrinkage: float = 10.0
    # mse: SVD++'s history factors (see the module): each user's vector also sums a vector
    # per item they rated, L2-regularised by history_lambda. On ML-100K u1-u5 (B1) and
    # synthetic explicit data alike they lower the RMSE (0.912 -> 0.902; 0.776 -> 0.701).
    history_factors: bool = True
    history_lambda: float = 60.0
    negative_ratio: int = 4  # bce: sampled negatives per positive
    negative_sampling: str = "uniform"  # bce: "uniform" or "popularity"
    positive_weight: float = 2.0  # wmse: weight c of an observed pair (confidence "constant")
    unobserved_weight: float = 1.0  # wmse: weight w0 of every unobserved pair
    # wmse: c of an observed pair from its value (rating, count, strength): "constant"
    # (positive_weight), "linear" (1 + alpha * value) or "log" (1 + alpha * log(1 + value)).
    confidence: str = "constant"
    alpha: float = 1.0
    # wmse: "adam" (the minibatch trainer, the mission's reference) or "als" (exact
    # alternating least squares, engine.models.als: the same cost, in seconds, no torch).
    solver: str = "adam"
    als_iterations: int = 15
    # als: shrink each user's factors toward those their attributes predict (a ridge
    # regression of the factors on the encoded user features, refitted each iteration;
    # engine.models.als) instead of toward zero. Users without features: no change.
    attribute_prior: bool = False
    validation_fraction: float = 0.05  # held out of the training data for early stopping
    patience: int = 5
    init_std: float = 0.1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in ("mse", "bce", "wmse"):
            raise ValueError(f"loss must be 'mse', 'bce' or 'wmse', got {self.loss!r}")
        if self.positive_weight <= 0 or self.unobserved_weight < 0:
            raise ValueError("positive_weight must be > 0 and unobserved_weight >= 0")
        if self.solver not in ("adam", "als"):
            raise ValueError(f"solver must be 'adam' or 'als', got {self.solver!r}")
        if self.solver == "als" and self.loss != "wmse":
            raise ValueError("solver 'als' minimises the wmse loss: set loss = 'wmse'")
        if self.attribute_prior and self.solver != "als":
            raise ValueError("attribute_prior is a prior of the ALS solver: set solver = 'als'")
        if self.confidence not in ("constant", "linear", "log"):
            raise ValueError(f"confidence must be 'constant', 'linear' or 'log', got {self.confidence!r}")
        if self.alpha < 0 or int(self.als_iterations) < 1:
            raise ValueError("alpha must be >= 0 and als_iterations >= 1")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {self.negative_sampling!r}")
        for name in ("n_features", "epochs", "batch_size", "negative_ratio", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.mean_shrinkage < 0:
            raise ValueError(f"mean_shrinkage must be >= 0, got {self.mean_shrinkage}")
        if self.lambda_ < 0 or self.learning_rate <= 0 or self.history_lambda < 0:
            raise ValueError("lambda_ and history_lambda must be >= 0 and learning_rate > 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.mean_normalization:
            # The item means take the place of the item bias and the global mean.
            self.item_bias, self.global_mean = False, False
        if self.loss == "wmse":
            # Biases would add their own all-pairs terms; the implicit objective has none.
            self.item_bias, self.global_mean, self.mean_normalization = False, False, False
        if self.loss != "mse":
            # Which items a user has is all that binary data says: nothing for them to add.
            self.history_factors = False

    @classmethod
    def from_dict(cls, values: dict) -> CFConfig:
        return from_known_settings(cls, {("lambda_" if k == "lambda" else k): v for k, v in values.items()}, "CF")


def wmse_cost(
    X: np.ndarray, W: np.ndarray, R: np.ndarray, lambda_: float, positive_weight: float, unobserved_weight: float
) -> float:
    """Reference ``wmse`` cost on a dense ``[n_items, n_users]`` interaction mask ``R``
    (tests only): every pair enumerated, observed pairs with target 1 and weight ``c``,
    the others with target 0 and weight ``w0``."""
    P = X @ W.T
    weights = np.where(R == 1, positive_weight, unobserved_weight)
    return float(0.5 * np.sum(weights * (R - P) ** 2) + lambda_ / 2 * (np.sum(W**2) + np.sum(X**2)))


# Named settings for `tandem train-cf --preset`: "rating" is CFConfig's defaults (B1:
# rating error); "topn" is the wmse objective by ALS, what the serving pipeline uses for
# implicit top-N. Chosen by CF NDCG@10 on temporal splits of four shapes (ML-100K, a
# 55k-click CSV with 800 items, a sparse 110k-interaction implicit set with 16k items, a
# long-history explicit synthetic set): 32 factors, lambda 40, log confidence with
# alpha 2 reached 0.985 of each shape's best over a 36-setting grid on average (the
# former 32 / 20 / constant 2: 0.84, 0.60 on the sparse set). `tandem tune` fits these
# per dataset.
PRESETS: dict[str, dict] = {
    "rating": {},
    "topn": {
        "loss": "wmse",
        "solver": "als",
        # The cost has converged by then: on ML-100K it is within 0.03% of its value
        # after 15 iterations (0.90332 vs 0.90306), and the pipeline's Recall/NDCG@10 is
        # the same within 0.5% on ML-100K u1-u5 and a 10k-item synthetic set.
        "als_iterations": 10,
        "n_features": 32,
        "lambda_": 40.0,
        "confidence": "log",
        "alpha": 2.0,
        "init_std": 0.01,
        "validation_fraction": 0.0,
        # Users' factors shrunk toward what their attributes predict (engine.models.als).
        # Measured beside the same pipeline without it: implicit 16k items, five random
        # splits, Recall@10 0.3348 -> 0.3364 (higher on each split); ML-100K temporal
        # 0.2214 -> 0.2259, u1-u5 0.4208 -> 0.4222, explicit 1k items 0.3493 -> 0.3498.
        "attribute_prior": True,
    },
}


# -------------------------------------------------------------------- model
@dataclass
class FoldedUser:
    """A user fitted on the fly by :meth:`CFModel.fold_in` (not part of the model)."""

    vector: np.ndarray  # [n_features]
    bias: float
    seen: np.ndarray  # item indices the user rated


class CFModel:
    """A trained matrix-factorisation model.

    Scores (``predict``, ``recommend``) are on the original rating scale for ``mse``
    (clipped to the training range), logits for ``bce`` and a preference near [0, 1] for
    ``wmse``. Every ranking method returns
    ``(item_ids, scores)``: external ids first, then the score or distance of each.
    """

    def __init__(
        self,
        X: np.ndarray,
        W: np.ndarray,
        user_bias: np.ndarray,
        item_bias: np.ndarray,
        global_mean: float,
        item_means: np.ndarray,
        users: IdMap,
        items: IdMap,
        seen_indptr: np.ndarray,
        seen_indices: np.ndarray,
        rating_range: tuple[float, float],
        config: CFConfig,
        metrics: dict | None = None,
        history_vectors: np.ndarray | None = None,
        user_prior: np.ndarray | None = None,
    ):
        self.X = np.ascontiguousarray(X, np.float32)  # [n_items, f]
        self.W = np.ascontiguousarray(W, np.float32)  # [n_users, f]
        self.user_bias = np.ascontiguousarray(user_bias, np.float32)  # [n_users]
        self.item_bias = np.ascontiguousarray(item_bias, np.float32)  # [n_items]
        self.global_mean = float(global_mean)
        self.item_means = np.ascontiguousarray(item_means, np.float32)  # [n_items]
        self.users, self.items = users, items
        self.seen_indptr = np.asarray(seen_indptr, np.int64)  # CSR [n_users, n_items] of training
        self.seen_indices = np.asarray(seen_indices, np.int32)
        self.rating_range = (float(rating_range[0]), float(rating_range[1]))
        self.config = config
        self.metrics = metrics or {}
        # [n_items, f] the history factors y(i) (config.history_factors), else None. The
        # training users' sums are already in W; fold_in adds a new user's.
        self.history_vectors = None if history_vectors is None else np.ascontiguousarray(history_vectors, np.float32)
        # [n_users, f] the prior means the ALS attribute prior shrank each user toward
        # (config.attribute_prior), else None: a training user's fold-in (live feedback)
        # is shrunk toward the same point.
        self.user_prior = None if user_prior is None else np.ascontiguousarray(user_prior, np.float32)

    # ----------------------------------------------------------- vectors
    @property
    def user_vectors(self) -> np.ndarray:
        """``[n_users, n_features]`` user vectors ``w``."""
        return self.W

    @property
    def item_vectors(self) -> np.ndarray:
        """``[n_items, n_features]`` item vectors ``x``."""
        return self.X

    @property
    def item_offsets(self) -> np.ndarray:
        """``[n_items]`` the per-item part of a score: item bias + item mean + global mean."""
        return self.item_bias + self.item_means + np.float32(self.global_mean)

    def seen(self, user_index: int) -> np.ndarray:
        """Item indices a user interacted with in training."""
        return self.seen_indices[self.seen_indptr[user_index] : self.seen_indptr[user_index + 1]]

    # ------------------------------------------------------- prediction
    def _finish(self, raw: np.ndarray) -> np.ndarray:
        if self.config.loss == "mse":
            return np.clip(raw, *self.rating_range).astype(np.float32)
        return raw.astype(np.float32)

    def predict(self, user_ids: Sequence[object], item_ids: Sequence[object]) -> np.ndarray:
        """Predicted ratings ``[n]`` for pairs of external ids (clipped to the training
        rating range), or logits for a ``bce`` model."""
        u = self.users.indices(user_ids)
        i = self.items.indices(item_ids)
        if len(u) != len(i):
            raise ValueError(f"user_ids and item_ids differ in length: {len(u)} vs {len(i)}")
        return self._finish(self.predict_indices(u, i))

    def predict_indices(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Unclipped scores ``[n]`` for dense index pairs."""
        return np.einsum("nf,nf->n", self.W[u], self.X[i]) + self.user_bias[u] + self.item_offsets[i]

    def predict_user(self, user: object | FoldedUser, item_ids: Sequence[object]) -> np.ndarray:
        """Scores ``[n]`` of items for one user: an external id or a :class:`FoldedUser`."""
        w, b, _ = self._user_parts(user)
        i = self.items.indices(item_ids)
        return self._finish(self.X[i] @ w + b + self.item_offsets[i])

    def _user_parts(self, user: object | FoldedUser) -> tuple[np.ndarray, float, np.ndarray]:
        if isinstance(user, FoldedUser):
            return user.vector, user.bias, user.seen
        u = self.users.index(user)
        return self.W[u], float(self.user_bias[u]), self.seen(u)

    # ------------------------------------------------ EmbeddingModel
    name = "cf"
    embeds_from_features = False  # a new user comes in through fold_in (ratings), not features

    def retrieval_item_vectors(self) -> np.ndarray:
        """``[x, offset]`` per item: with :meth:`retrieval_user_vectors` (``[w, 1]``) the
        inner product is the prediction without the user bias."""
        return np.hstack([self.X, self.item_offsets[:, None]]).astype(np.float32)

    def retrieval_user_vectors(self, user_indices: np.ndarray) -> np.ndarray:
        w = self.W[np.asarray(user_indices, np.int64)]
        return np.hstack([w, np.ones((len(w), 1), np.float32)]).astype(np.float32)

    def user_biases(self, user_indices: np.ndarray) -> np.ndarray:
        return self.user_bias[np.asarray(user_indices, np.int64)]

    def fold_in_query(self, folded: FoldedUser) -> np.ndarray:
        """A folded-in user's query against :meth:`retrieval_item_vectors`: ``[w, 1]``."""
        return np.append(folded.vector, 1).astype(np.float32)

    def cold_user_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        raise NotImplementedError("CF embeds no features: fold a new user in from ratings (fold_in)")

    def cold_item_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        raise NotImplementedError("CF embeds no features: a new item has no CF vector until retraining")

    # --------------------------------------------------------- retrieval
    def recommend(self, user: object | FoldedUser, k: int = 10, exclude_seen: bool = True) -> Recommendations:
        """Top ``k`` items for a user by exact brute force over every item: the
        predictions as scores, best first (fewer than ``k`` only when fewer items remain
        after excluding the seen ones)."""
        w, b, seen = self._user_parts(user)
        scores = self.X @ w + b + self.item_offsets
        if exclude_seen and len(seen):
            scores[seen] = -np.inf
        top = top_k_desc(scores, k)
        top = top[np.isfinite(scores[top])]
        return Recommendations(self.items.external(top), self._finish(scores[top]), [("cf",)] * len(top))

    def recommend_indices(
        self, user_indices: np.ndarray, k: int = 10, exclude_seen: bool = True, chunk: int = 1024
    ) -> np.ndarray:
        """Top ``k`` item indices ``[n_users, k]`` for many users (``-1`` pads), exact."""
        user_indices = np.asarray(user_indices, np.int64)
        out = np.full((len(user_indices), k), -1, np.int64)
        seen = (
            sp.csr_matrix(
                (np.ones(len(self.seen_indices)), self.seen_indices, self.seen_indptr),
                shape=(len(self.users), len(self.items)),
            )
            if exclude_seen
            else None
        )
        for start in range(0, len(user_indices), chunk):
            us = user_indices[start : start + chunk]
            scores = self.W[us] @ self.X.T + self.item_offsets  # user bias does not change the order
            out[start : start + len(us)] = top_k_rows(scores, k, seen, us)
        return out

    def similar_items(self, item_id: object, k: int = 10) -> Recommendations:
        """The ``k`` items nearest to ``item_id`` by squared distance ``|x(k) - x(i)|^2``,
        ascending, the item itself excluded (scores are the squared distances)."""
        i = self.items.index(item_id)
        d = np.sum((self.X - self.X[i]) ** 2, axis=1)
        d[i] = np.inf
        top = top_k_desc(-d, min(k, len(d) - 1))  # nearest first, ties by lower index
        ids = self.items.external(top)
        return Recommendations(ids, d[top].astype(np.float32), [("cf",)] * len(top), metric=SQUARED_DISTANCE)

    # ----------------------------------------------------------- fold-in
    def fold_in(self, item_ids: Sequence[object], ratings: Sequence[float] | None = None) -> FoldedUser:
        """Fit a new user's vector ``w`` and bias ``b`` from a few ratings, ``X`` fixed
        (none: the user with no ratings, ``w = 0``, ``b = 0``, predicted the item offsets).

        For ``mse`` this minimises the mission's cost restricted to that user —
        ``1/2 sum (w.x(i) + b + offset(i) - y(i))^2 + lambda/2 |w|^2`` — in closed form;
        with history factors the vector is ``w + z``, ``z = |S|^-1/2 sum_{i in S} y(i)``
        over the rated items ``S``, and the same cost is minimised over ``w`` and ``b``.
        For ``bce`` the given items are positives (``ratings`` ignored) against sampled
        negatives, fitted by Newton's method on the regularised log-loss. For ``wmse``
        they are positives against every other item, solved exactly:
        ``(w0 X^T X + (c - w0) X_S^T X_S + lambda I) w = c X_S^T 1``.
        """
        return self.fold_in_indices(self.items.indices(item_ids), ratings)

    def fold_in_indices(
        self, i: np.ndarray, ratings: Sequence[float] | np.ndarray | None = None, prior: np.ndarray | None = None
    ) -> FoldedUser:
        """:meth:`fold_in` of item indices. ``prior``: for a ``wmse`` model trained with
        the attribute prior, the point the user's vector is shrunk toward (a training
        user's row of :attr:`user_prior`; ``lambda/2 |w - prior|^2`` replaces
        ``lambda/2 |w|^2``, and ``lambda prior`` joins the right-hand side)."""
        i = np.asarray(i, np.int64)
        f = self.X.shape[1]
        if len(i) == 0 and prior is None:  # no ratings: no taste of their own, the item offsets alone
            return FoldedUser(np.zeros(f, np.float32), 0.0, np.zeros(0, np.int64))
        lam = self.config.lambda_
        if self.config.loss == "mse":
            if ratings is None or len(ratings) != len(i):
                raise ValueError("fold_in needs one rating per item for an mse model")
            y = np.asarray(ratings, np.float64)
            if not np.isfinite(y).all():
                raise ValueError("ratings must be finite")
            rated = np.unique(i)
            z = np.zeros(f)
            if self.history_vectors is not None:
                z = self.history_vectors[rated].sum(axis=0, dtype=np.float64) / np.sqrt(len(rated))
            A = np.hstack([self.X[i].astype(np.float64), np.ones((len(i), 1))])
            target = y - self.item_offsets[i] - self.X[i] @ z
            reg = np.diag(np.r_[np.full(f, lam), 0.0])  # b is not regularised
            # A tiny ridge on b keeps the system solvable with a single rating.
            theta = np.linalg.solve(A.T @ A + reg + 1e-9 * np.eye(f + 1), A.T @ target)
            return FoldedUser((theta[:f] + z).astype(np.float32), float(theta[f]), rated)
        if self.config.loss == "wmse":
            cfg, w0 = self.config, self.config.unobserved_weight
            items, first = np.unique(i, return_index=True)
            values = np.ones(len(i)) if ratings is None else np.asarray(ratings, np.float64)
            c = confidence(values[first], cfg.confidence, cfg.positive_weight, cfg.alpha)
            Xs = self.X[items].astype(np.float64)
            rhs = Xs.T @ c if prior is None else Xs.T @ c + lam * np.asarray(prior, np.float64)
            w = np.linalg.solve(w0 * self._gram() + (Xs * (c - w0)[:, None]).T @ Xs + lam * np.eye(f), rhs)
            return FoldedUser(w.astype(np.float32), 0.0, items)
        rng = np.random.default_rng(self.config.seed)
        negatives = rng.integers(0, len(self.X), len(i) * self.config.negative_ratio)
        negatives = negatives[~np.isin(negatives, i)]
        rows = np.r_[i, negatives]
        A = np.hstack([self.X[rows].astype(np.float64), np.ones((len(rows), 1))])
        y = np.r_[np.ones(len(i)), np.zeros(len(negatives))]
        offset = self.item_offsets[rows].astype(np.float64)
        theta = np.zeros(f + 1)
        reg = np.diag(np.r_[np.full(f, lam), 1e-6])
        for _ in range(25):
            p = 1 / (1 + np.exp(-(A @ theta + offset)))
            grad = A.T @ (p - y) + reg @ theta
            hess = (A * (p * (1 - p))[:, None]).T @ A + reg
            step = np.linalg.solve(hess, grad)
            theta -= step
            if np.abs(step).max() < 1e-8:
                break
        return FoldedUser(theta[:f].astype(np.float32), float(theta[f]), np.unique(i))

    def _gram(self) -> np.ndarray:
        """``X^T X`` in float64, computed once: every wmse fold-in needs it."""
        gram = getattr(self, "_gram_cache", None)
        if gram is None:
            gram = self._gram_cache = self.X.T.astype(np.float64) @ self.X
        return gram

    # ------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the model to directory ``path``: ``cf.json`` (config, metrics, format
        version) and ``cf_arrays.npz`` (plain arrays; no pickle)."""
        arrays = {
            "X": self.X,
            "W": self.W,
            "user_bias": self.user_bias,
            "item_bias": self.item_bias,
            "item_means": self.item_means,
            "user_ids": self.users.ids,
            "item_ids": self.items.ids,
            "seen_indptr": self.seen_indptr,
            "seen_indices": self.seen_indices,
        }
        if self.history_vectors is not None:
            arrays["history_vectors"] = self.history_vectors
        if self.user_prior is not None:
            arrays["user_prior"] = self.user_prior
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "cf",
            "config": asdict(self.config),
            "global_mean": self.global_mean,
            "rating_range": list(self.rating_range),
            "n_users": len(self.users),
            "n_items": len(self.items),
            "n_features": self.X.shape[1],
            "metrics": self.metrics,
        }
        return write_model_dir(path, "cf", meta, arrays)

    @classmethod
    def load(cls, path: str | Path) -> CFModel:
        """Read a model written by :meth:`save`, checking its format and shapes."""
        path = Path(path)
        meta, arrays = read_model_dir(path, "cf", "cf", FORMAT_VERSION)
        n_users, n_items, f = meta["n_users"], meta["n_items"], meta["n_features"]
        expected = {
            "X": (n_items, f),
            "W": (n_users, f),
            "user_bias": (n_users,),
            "item_bias": (n_items,),
            "item_means": (n_items,),
            "user_ids": (n_users,),
            "item_ids": (n_items,),
            "seen_indptr": (n_users + 1,),
        }
        if "history_vectors" in arrays:
            expected["history_vectors"] = (n_items, f)
        if "user_prior" in arrays:
            expected["user_prior"] = (n_users, f)
        for name, shape in expected.items():
            if name not in arrays or arrays[name].shape != shape:
                found = arrays[name].shape if name in arrays else "nothing"
                raise TandemError(f"{path / 'cf_arrays.npz'}: {name} expected shape {shape}, found {found}")
        # (A model saved before history factors existed has none.)
        config = CFConfig(**{"history_factors": False, **meta["config"]})
        return cls(
            arrays["X"],
            arrays["W"],
            arrays["user_bias"],
            arrays["item_bias"],
            meta["global_mean"],
            arrays["item_means"],
            IdMap(arrays["user_ids"], "user"),
            IdMap(arrays["item_ids"], "item"),
            arrays["seen_indptr"],
            arrays["seen_indices"],
            tuple(meta["rating_range"]),
            config,
            meta.get("metrics"),
            arrays.get("history_vectors"),
            arrays.get("user_prior"),
        )


# ----------------------------------------------------------------- training
def sparse_cost(
    params: dict, u, i, y, lambda_: float, histories: UserHistories | None = None, history_lambda: float = 0.0
):
    """The mission's cost ``J`` over the given ratings, from sparse index arrays (torch).

    ``params`` holds ``X``, ``W``, ``b`` and optionally ``c`` (item bias), ``mu`` and
    ``Yh`` (history factors, with ``histories``). Equal to :func:`cofi_cost` (with
    ``Yh``: :func:`history_cost`) on the same data when ``c`` and ``mu`` are zero.
    """
    pred = _torch_predict(params, u, i, histories)
    reg = lambda_ / 2 * (params["W"].pow(2).sum() + params["X"].pow(2).sum())
    if histories is not None:
        reg = reg + history_lambda / 2 * params["Yh"].pow(2).sum()
    return 0.5 * (pred - y).pow(2).sum() + reg


def _rank_generator(shared, seed: int, rank: int, size: int):
    """The torch generator of a rank's own draws (its users' starting rows, batch orders,
    negatives): on one process the ``shared`` one, which drew the item table first; on
    N, one per rank, seeded by ``seed`` and the rank."""
    import torch

    if size == 1:
        return shared
    return torch.Generator(device="cpu").manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


@functools.cache
def _row_gather():
    """``rows(table, index)``: ``table[index]`` for autograd, whose backward accumulates
    the rows' gradients with ``index_add_``. Accumulating them is most of a step at B6's
    scale, and ``index_add_`` does it about 4x faster on CPU than ``embedding``'s backward
    (262k rows of 32 into 140k: 9 ms against 37 ms), itself several times faster than
    advanced indexing's."""
    import torch

    class Rows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, table, index):
            ctx.save_for_backward(index)
            ctx.n_rows = table.shape[0]
            return table.index_select(0, index)

        @staticmethod
        def backward(ctx, grad):
            (index,) = ctx.saved_tensors
            table_grad = torch.zeros((ctx.n_rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            return table_grad.index_add_(0, index, grad), None

    return Rows.apply


class UserHistories:
    """The items each user rated, for history factors: ``N [n_users, n_items]``, each
    user's rated flags times ``|N(j)|^-1/2``, as torch CSR matrices (``N`` and ``N^T``)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, device, dtype=np.float32):
        import torch

        rated = sp.csr_matrix((np.ones(len(users), dtype), (users, items)), shape=(n_users, n_items))
        rated.sum_duplicates()
        rated.data[:] = 1.0
        counts = np.diff(rated.indptr)
        rated = sp.diags(1 / np.sqrt(np.maximum(counts, 1))) @ rated

        def to_torch(m):
            m = sp.csr_matrix(m, dtype=dtype)
            m.sort_indices()
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    torch.as_tensor(m.indptr.astype(np.int64)),
                    torch.as_tensor(m.indices.astype(np.int64)),
                    torch.as_tensor(m.data),
                    m.shape,
                ).to(device)

        self.matrix, self.transposed = to_torch(rated), to_torch(rated.T)

    def sums(self, Yh, users):
        """``[len(users), f]``: ``|N(j)|^-1/2 sum_{i in N(j)} y(i)`` for each of ``users``.
        Computed for all of the table's users at once: a step's random rows hold most of
        them, and one sparse product (its backward ``N^T G`` with the stored transpose)
        costs less than gathering each one's history."""
        return _row_gather()(_history_sum()(Yh, self.matrix, self.transposed), users)


@functools.cache
def _history_sum():
    """``sum(Yh, N, N^T)``: ``N Yh`` for autograd, whose backward is ``N^T G`` with the
    given transpose (torch's own backward of a CSR product is several times slower)."""
    import torch

    class HistorySum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, Yh, matrix, transposed):
            ctx.transposed = transposed
            return torch.sparse.mm(matrix, Yh)

        @staticmethod
        def backward(ctx, grad):
            return torch.sparse.mm(ctx.transposed, grad), None, None

    return HistorySum.apply


def _torch_predict(params: dict, u, i, histories: UserHistories | None = None):
    rows = _row_gather()
    user_vectors = rows(params["W"], u)
    if histories is not None:
        user_vectors = user_vectors + histories.sums(params["Yh"], u)
    pred = (user_vectors * rows(params["X"], i)).sum(1)
    if "b" in params:
        pred = pred + rows(params["b"], u)
    if "c" in params:
        pred = pred + rows(params["c"], i)
    if "mu" in params:
        pred = pred + params["mu"]
    return pred


def mse_data_term(params: dict, u, i, y, histories: UserHistories | None = None):
    """A minibatch's data term for ``mse``: half the mean squared error."""
    return 0.5 * (_torch_predict(params, u, i, histories) - y).pow(2).mean()


def wmse_data_term(params: dict, u, i, n_ratings: int, positive_weight, unobserved_weight: float):
    """A minibatch's data term for ``wmse`` (``positive_weight``: ``c``, one number or one
    per pair): the observed pairs' mean of
    ``1/2 (c (1 - p)^2 - w0 p^2)`` (their share of the all-pairs sum taken back) plus
    ``1/n_ratings`` of the all-pairs term ``w0/2 sum_kl (W^T W)_kl (X^T X)_kl``. A batch
    of all ``n_ratings`` pairs gives exactly ``(J - L2) / n_ratings``. The all-pairs term
    costs ``O((n_users + n_items) f^2)`` per step, so this loss suits large batches."""
    observed = wmse_observed_sum(params, u, i, positive_weight, unobserved_weight)
    return observed / len(u) + wmse_all_pairs(params, unobserved_weight) / n_ratings


def wmse_observed_sum(params: dict, u, i, positive_weight, unobserved_weight: float):
    """The observed pairs' part of ``wmse``'s data term: ``sum 1/2 (c (1 - p)^2 - w0 p^2)``."""
    pred = _torch_predict(params, u, i)
    return 0.5 * (positive_weight * (1 - pred).pow(2) - unobserved_weight * pred.pow(2)).sum()


def wmse_all_pairs(params: dict, unobserved_weight: float):
    """``w0/2 sum_kl (W^T W)_kl (X^T X)_kl``: ``w0/2`` times the sum of every (user, item)
    prediction squared. Linear in ``W^T W``: a rank holding some users' rows computes
    their share of it."""
    W, X = params["W"], params["X"]
    return unobserved_weight / 2 * ((W.T @ W) * (X.T @ X)).sum()


def add_l2_gradient(params: dict, lambda_: float, n_ratings: int, history_lambda: float = 0.0) -> None:
    """Add the gradient of :func:`l2_term` — ``(lambda / n_ratings) W`` and likewise for
    ``X``, ``(history_lambda / n_ratings) Yh`` for history factors — to their ``grad``."""
    import torch

    with torch.no_grad():
        for name in ("W", "X"):
            params[name].grad.add_(params[name], alpha=lambda_ / n_ratings)
        if "Yh" in params:
            params["Yh"].grad.add_(params["Yh"], alpha=history_lambda / n_ratings)


def l2_term(params: dict, lambda_: float, n_ratings: int, history_lambda: float = 0.0) -> float:
    """A minibatch's share of the cost's L2 terms: ``lambda / (2 n_ratings) (|W|^2 + |X|^2)``
    (on N ranks, each holding some users' rows of ``W`` and all of ``X``: the whole's),
    plus ``history_lambda / (2 n_ratings) |Yh|^2`` for history factors."""
    import torch

    with torch.no_grad():
        users = distributed.total(float(params["W"].pow(2).sum()))
        history = history_lambda * float(params["Yh"].pow(2).sum()) if "Yh" in params else 0.0
        return (lambda_ * (users + float(params["X"].pow(2).sum())) + history) / (2 * n_ratings)


def train_cf(
    dataset: Dataset, config: CFConfig | None = None, curve_path: str | Path | None = None, **overrides
) -> CFModel | None:
    """Train matrix factorisation on ``dataset``'s interactions.

    On one rank of a distributed run (``torchrun``, :mod:`engine.models.distributed`)
    the Adam solver trains on the rank's users' interactions in ``dataset`` (all of it,
    or only the rank's parts of a sharded directory) together with the other ranks;
    rank 0 returns the model, the others None.

    Args:
        dataset: the training interactions (its id maps define the model's users/items).
        config: a :class:`CFConfig`; keyword ``overrides`` replace its fields
            (``train_cf(ds, n_features=32, loss="bce")``).
        curve_path: where to save the learning curve as JSON (and PNG) — optional.
    """
    cfg = CFConfig(**{**asdict(config or CFConfig()), **overrides})
    if cfg.solver == "als":
        if dataset.n_ratings == 0:
            raise ValueError("cannot train on a dataset with no interactions")
        return _train_als(dataset, cfg, curve_path)
    torch = require_torch()
    from tqdm.auto import tqdm

    from engine.models.adam import Adam

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    # One rank of N (torchrun, engine.models.distributed): this rank's users' interactions
    # and their rows of the user table; a statistic of the whole data is a sum over the
    # ranks. On one process every "rank's" quantity below is the whole's.
    rank, size = distributed.world()
    dataset = distributed.own_users(dataset)
    rng = np.random.default_rng(cfg.seed if size == 1 else [cfg.seed, rank])
    n_users, n_items, f = dataset.n_users, dataset.n_items, cfg.n_features

    if distributed.total(dataset.n_ratings) == 0:
        raise ValueError("cannot train on a dataset with no interactions")
    u_all, i_all = dataset.user_idx.astype(np.int64), dataset.item_idx.astype(np.int64)
    u_row = u_all if size == 1 else u_all // size  # a user's row in this rank's part of the user table
    y_all = dataset.ratings.astype(np.float32)
    if cfg.loss == "bce":
        y_all = np.ones_like(y_all)  # every interaction is a positive
    if cfg.loss == "wmse":  # every interaction is a positive, weighted by its confidence
        y_all = confidence(dataset.ratings, cfg.confidence, cfg.positive_weight, cfg.alpha).astype(np.float32)
    counts = distributed.total_array(np.bincount(i_all, minlength=n_items))
    sums = distributed.total_array(np.bincount(i_all, weights=y_all, minlength=n_items))
    fallback = float(sums.sum() / counts.sum())
    shrink = cfg.mean_shrinkage
    item_means = ((sums + shrink * fallback) / np.maximum(counts + shrink, 1e-12)).astype(np.float32)
    item_means[counts == 0] = fallback
    if not cfg.mean_normalization:
        item_means = np.zeros(n_items, np.float32)
    target = y_all - item_means[i_all]
    lo, hi = distributed.value_range(y_all)

    # Validation split for early stopping (seeded), out of the training interactions.
    n_val = int(round(len(u_all) * cfg.validation_fraction))
    perm = rng.permutation(len(u_all))
    val_rows, fit_rows = perm[:n_val], perm[n_val:]
    n_val_total = int(distributed.total(n_val))

    def tensors(users, items, targets):
        return (
            torch.as_tensor(users, dtype=torch.long, device=device),
            torch.as_tensor(items, dtype=torch.long, device=device),
            torch.as_tensor(targets, dtype=torch.float32, device=device),
        )

    # History factors: each of this rank's users' rated items (fit and validation rows
    # alike: which items a user rated is known, only the held-out values are not).
    histories = (
        UserHistories(u_row, i_all, distributed.n_owned(n_users), n_items, device) if cfg.history_factors else None
    )
    n_fit = len(fit_rows)
    N = int(distributed.total(n_fit))  # the cost's N: the whole data's
    U, I, Y = tensors(u_row[fit_rows], i_all[fit_rows], target[fit_rows])
    Uv, Iv, Yv = tensors(u_row[val_rows], i_all[val_rows], target[val_rows])
    del u_all, u_row, i_all, target, perm, fit_rows, val_rows  # (the tensors hold what training needs)
    # The ranks take the same number of steps per epoch, each covering its own rows once;
    # step_rows[s] counts the rows of step s on all ranks together.
    bounds, step_rows = distributed.epoch_steps(n_fit, cfg.batch_size)
    steps = len(step_rows)

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x_start = torch.randn(n_items, f, generator=gen) * cfg.init_std  # the same on every rank
    rank_gen = _rank_generator(gen, cfg.seed, rank, size)
    params = {
        "X": torch.nn.Parameter(x_start.to(device)),
        "W": torch.nn.Parameter(
            (torch.randn(distributed.n_owned(n_users), f, generator=rank_gen) * cfg.init_std).to(device)
        ),
    }
    if cfg.loss != "wmse":
        params["b"] = torch.nn.Parameter(torch.zeros(distributed.n_owned(n_users), device=device))
    if cfg.item_bias:
        params["c"] = torch.nn.Parameter(torch.zeros(n_items, device=device))
    if cfg.global_mean:
        start_mu = distributed.total(float(Y.sum(dtype=torch.float64))) / N if cfg.loss == "mse" else 0.0
        params["mu"] = torch.nn.Parameter(torch.tensor(start_mu, device=device))
    if histories is not None:  # from zero: the model starts as plain MF
        params["Yh"] = torch.nn.Parameter(torch.zeros(n_items, f, device=device))
    # The user rows are this rank's own; the rest is replicated on every rank.
    replicated = {name: p for name, p in params.items() if name not in ("W", "b")}
    # (The fused kernel is ~10% faster per step where the device has one.)
    optimizer = Adam(params.values(), lr=cfg.learning_rate, fused=True)

    neg_cdf = None
    if cfg.loss == "bce" and cfg.negative_sampling == "popularity":
        neg_cdf = torch.as_tensor(np.cumsum(counts) / counts.sum(), dtype=torch.float64)

    def sample_negatives(n: int, generator):  # -> torch.Tensor
        if neg_cdf is None:
            return torch.randint(0, n_items, (n,), generator=generator).to(device)
        draws = torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.searchsorted(neg_cdf, draws).clamp_(max=n_items - 1).to(device)

    def bce_sum(u, i, generator):
        """The positives' and their negatives' log-loss, summed (per positive, like the
        mse term)."""
        pred = _torch_predict(params, u, i)
        neg_i = sample_negatives(len(u) * cfg.negative_ratio, generator)
        neg_u = u.repeat_interleave(cfg.negative_ratio)
        logits = torch.cat([pred, _torch_predict(params, neg_u, neg_i)])
        labels = torch.cat([torch.ones_like(pred), torch.zeros(len(neg_i), device=device)])
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")

    def batch_data_loss(u, i, y, step_total: int):
        """This rank's share of the data term of a step's batch (``step_total`` rows on
        all ranks; the shares add up to the batch's term, so the replicated parameters'
        gradients are summed over the ranks). Its L2 part, lambda/(2N) (|W|^2 + |X|^2),
        enters as its exact gradient (lambda/N) W in :func:`add_l2_gradient`: the same
        step as autograd would take, without a dense backward pass through the tables."""
        share = len(u) / step_total  # 1 on one process
        if len(u) == 0:  # a rank with fewer rows: no data term, but every replica in the graph
            data_term = sum(p.sum() for p in replicated.values()) * 0.0
        elif cfg.loss == "mse":
            data_term = share * mse_data_term(params, u, i, y, histories)
        elif cfg.loss == "wmse":  # y: each pair's confidence
            data_term = share * wmse_observed_sum(params, u, i, y, cfg.unobserved_weight) / len(u)
        else:
            data_term = share * bce_sum(u, i, rank_gen) / len(u)
        if cfg.loss == "wmse":  # this rank's users' share of the all-pairs term
            data_term = data_term + wmse_all_pairs(params, cfg.unobserved_weight) / N
        return data_term

    def validate() -> float:
        """The validation figure over every rank's held-out rows."""
        if n_val_total == 0:
            return math.nan
        with torch.no_grad():
            pred = _torch_predict(params, Uv, Iv, histories)
            if cfg.loss == "mse":
                means = torch.as_tensor(item_means, device=device)[Iv]
                squared = float(((pred + means).clamp(lo, hi) - (Yv + means)).pow(2).sum())
                return math.sqrt(distributed.total(squared) / n_val_total)
            if cfg.loss == "wmse":  # the objective's data part with held-out positives as observed
                observed = distributed.total(float(wmse_observed_sum(params, Uv, Iv, Yv, cfg.unobserved_weight)))
                all_pairs = distributed.total(float(wmse_all_pairs(params, cfg.unobserved_weight)))
                return observed / n_val_total + all_pairs / N
            # The training objective's data term on held-out positives and their
            # negatives (the same ones every epoch), so that both curves compare.
            vgen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1 + rank)
            return distributed.total(float(bce_sum(Uv, Iv, vgen))) / n_val_total

    # One rank of N: the replicas start from rank 0's parameters and stay equal.
    model = distributed.summing_data_parallel(distributed.loss_module(replicated, batch_data_loss))
    val_name = {"mse": "val_rmse", "bce": "val_logloss", "wmse": "val_loss"}[cfg.loss]
    curve = LearningCurve()
    stopper = EarlyStopping(patience=cfg.patience)
    best_state = {k: v.detach().clone() for k, v in params.items()}
    show = cfg.progress and rank == 0
    bar = tqdm(total=cfg.epochs * steps, desc="train cf", unit="batch", disable=not show, mininterval=0.5)
    l2 = l2_term(params, cfg.lambda_, N, cfg.history_lambda)
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        order = torch.randperm(n_fit, generator=rank_gen).to(device)
        running = 0.0
        for s in range(steps):
            idx = order[bounds[s] : bounds[s + 1]]
            loss = model(U[idx], I[idx], Y[idx], step_rows[s])
            optimizer.zero_grad()
            loss.backward()  # (on N ranks: the replicated parameters' gradients summed)
            add_l2_gradient(params, cfg.lambda_, N, cfg.history_lambda)
            optimizer.step()
            running += float(loss.detach()) * step_rows[s]
            bar.update(1)
            if s % 20 == 0 and size == 1:  # (on N ranks the loss is a sum over them: shown per epoch)
                bar.set_postfix(epoch=epoch, loss=f"{running / sum(step_rows[: s + 1]) + l2:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - epoch_start
        val = validate()
        # The epoch's mean data term plus the L2 term at the epoch's end: J / N, up to the
        # parameters moving within the epoch.
        l2 = l2_term(params, cfg.lambda_, N, cfg.history_lambda)
        train_loss = distributed.total(running) / N + l2
        curve.add(epoch=epoch, train_loss=train_loss, seconds=epoch_seconds, **({val_name: val} if n_val_total else {}))
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", **({val_name: f"{val:.4f}"} if n_val_total else {}))
        if n_val_total:
            improved, stop = stopper.step(val, epoch)
            if improved:
                best_state = {k: v.detach().clone() for k, v in params.items()}
            if stop:
                break
        else:
            best_state = {k: v.detach().clone() for k, v in params.items()}
    bar.close()
    if curve_path is not None and rank == 0:
        curve.save(curve_path, title=f"CF ({cfg.loss})")
    distributed.check_replicas(replicated)

    if histories is not None:  # each user's history sum, folded into their vector
        with torch.no_grad():
            own = torch.arange(len(best_state["W"]), device=device)
            best_state["W"] = best_state["W"] + histories.sums(best_state["Yh"], own)
    state = {k: v.cpu().numpy() for k, v in best_state.items()}
    # Rank 0 gathers the users' rows and interactions (whose seen lists the model keeps).
    w_parts, b_parts, user_parts, item_parts = (
        distributed.gather_to_first(array)
        for array in (
            state["W"],
            state.get("b", np.zeros(len(state["W"]), np.float32)),
            dataset.user_idx,
            dataset.item_idx,
        )
    )
    distributed.barrier()
    if w_parts is None or b_parts is None or user_parts is None or item_parts is None:
        return None  # a rank other than 0
    W = np.empty((n_users, f), np.float32)
    b = np.empty(n_users, np.float32)
    for r in range(size):  # rank r held users r, r + N, ...
        W[r::size], b[r::size] = w_parts[r], b_parts[r]
    if size == 1:  # the data's own view, cached: the index build reuses it
        seen = dataset.user_items()
    else:
        users, items = np.concatenate(user_parts), np.concatenate(item_parts)
        seen = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
        seen.sort_indices()
    # Users with no training interactions keep nothing but their random start shrunk by
    # L2: zero them, so that a cold user is predicted by the item offsets alone. Items
    # with none get tiny *distinct* vectors instead: thousands of identical zero vectors
    # wreck an HNSW graph (recall@10 0.23 instead of 0.97 on a 100k catalogue with 7.5k
    # unrated items), while 1e-3 noise leaves their predictions at the offsets.
    user_has = np.diff(seen.indptr) > 0
    item_has = counts > 0
    W, b = W * user_has[:, None], b * user_has
    X = state["X"].copy()
    X[~item_has] = rng.normal(0, 1e-3, (int((~item_has).sum()), f)).astype(np.float32)
    return CFModel(
        X=X,
        W=W,
        user_bias=b,
        item_bias=state.get("c", np.zeros(n_items, np.float32)),
        global_mean=float(state.get("mu", 0.0)),
        item_means=item_means,
        users=dataset.users,
        items=dataset.items,
        seen_indptr=seen.indptr,
        seen_indices=seen.indices,
        rating_range=(lo, hi) if cfg.loss == "mse" else (0.0, 1.0),
        config=cfg,
        history_vectors=state.get("Yh"),
        metrics={
            "best_epoch": stopper.best_epoch,
            val_name: stopper.best if n_val_total else None,
            "epochs_run": len(curve.records),
            "ratings_per_second": N / float(np.median([r["seconds"] for r in curve.records])),
            "learning_curve": curve.records,
        },
    )


def user_attribute_matrix(dataset: Dataset) -> np.ndarray | None:
    """The users' encoded attributes for the ALS attribute prior: the towers' encoding
    of the feature table's columns (:func:`engine.models.features.fit_user_pipeline`;
    one-hot categories, regions, standardised numbers), no rating history, constant
    columns dropped, plus an intercept. None when the data has no user attributes.
    ALS trains in one process, rank 0's of a distributed run: alone, not waiting for
    the other ranks' statistics."""
    if dataset.user_features is None:
        return None
    with distributed.alone():
        pipeline = fit_user_pipeline(dataset)
    encoded = pipeline.transform_attributes(dataset.user_features, np.arange(dataset.n_users))
    encoded = encoded[:, encoded.std(axis=0) > 0].astype(np.float64)
    if encoded.shape[1] == 0:
        return None
    return np.hstack([encoded, np.ones((dataset.n_users, 1))])


def _train_als(dataset: Dataset, cfg: CFConfig, curve_path: str | Path | None) -> CFModel:
    """``wmse`` by alternating least squares (:mod:`engine.models.als`): the cost of the
    Adam trainer, minimised exactly one half-step at a time, with a progress bar and the
    cost of each iteration as the learning curve."""
    from tqdm.auto import tqdm

    ui = dataset.user_items()
    pairs = sp.csr_matrix(
        (
            confidence(dataset.ratings, cfg.confidence, cfg.positive_weight, cfg.alpha),
            (dataset.user_idx, dataset.item_idx),
        ),
        shape=(dataset.n_users, dataset.n_items),
    )
    curve = LearningCurve()
    bar = tqdm(total=cfg.als_iterations, desc="train cf (als)", unit="iteration", disable=not cfg.progress)
    last = [time.perf_counter()]

    def on_iteration(iteration: int, W: np.ndarray, X: np.ndarray, prior: np.ndarray | None) -> None:
        now = time.perf_counter()
        cost = wmse_sparse_cost(W, X, pairs, cfg.lambda_, cfg.unobserved_weight, prior) / dataset.n_ratings
        curve.add(epoch=iteration, train_loss=cost, seconds=now - last[0])
        bar.update(1)
        bar.set_postfix(loss=f"{cost:.4f}")
        last[0] = now

    start = time.perf_counter()
    W, X, user_prior = als_wmse(
        pairs,
        cfg.n_features,
        cfg.lambda_,
        cfg.unobserved_weight,
        cfg.als_iterations,
        cfg.init_std,
        cfg.seed,
        on_iteration,
        user_attributes=user_attribute_matrix(dataset) if cfg.attribute_prior else None,
    )
    seconds = time.perf_counter() - start
    bar.close()
    if curve_path is not None:
        curve.save(curve_path, title="CF (wmse, ALS)")
    # Items nobody interacted with solve to 0: tiny distinct vectors instead, as the Adam
    # trainer leaves them (identical zero vectors wreck an HNSW graph).
    unrated = dataset.item_counts() == 0
    X[unrated] = np.random.default_rng(cfg.seed).normal(0, 1e-3, (int(unrated.sum()), cfg.n_features))
    n_items, n_users = dataset.n_items, dataset.n_users
    return CFModel(
        X=X,
        W=W,
        user_bias=np.zeros(n_users, np.float32),
        item_bias=np.zeros(n_items, np.float32),
        global_mean=0.0,
        item_means=np.zeros(n_items, np.float32),
        users=dataset.users,
        items=dataset.items,
        seen_indptr=ui.indptr,
        seen_indices=ui.indices,
        rating_range=(0.0, 1.0),
        config=cfg,
        user_prior=user_prior,
        metrics={
            "epochs_run": cfg.als_iterations,
            "train_cost": curve.records[-1]["train_loss"],
            "fit_seconds": seconds,
            "ratings_per_second": dataset.n_ratings * cfg.als_iterations / max(seconds, 1e-9),
            "learning_curve": curve.records,
        },
    )
