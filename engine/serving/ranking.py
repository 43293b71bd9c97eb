"""Exact ranking: the blend of a candidate's two-tower score and CF prediction, each
standardised with statistics fixed per bundle, with configurable weights (top-k
selection is :mod:`engine.topk`).

Standardising with bundle-wide statistics (not per request) keeps a pair's score the
same whatever else is being ranked, so ``score`` of a few items, ``recommend`` and
``recommend_batch`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ScoreScale:
    """Mean and standard deviation of one score over (user, item) pairs of the bundle."""

    mean: float
    std: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (scores - self.mean) / self.std

    @classmethod
    def fit(cls, samples: np.ndarray) -> ScoreScale:
        samples = np.asarray(samples, np.float64).ravel()
        std = float(samples.std()) if samples.size > 1 else 1.0
        return cls(float(samples.mean()) if samples.size else 0.0, std if std > 1e-9 else 1.0)


@dataclass
class BlendWeights:
    """Weights of the standardised tower score and CF prediction for known users; users
    unknown to CF are ranked by the tower score alone."""

    towers: float = 0.5
    cf: float = 0.5

    def __post_init__(self) -> None:
        if self.towers < 0 or self.cf < 0 or self.towers + self.cf == 0:
            raise ValueError(f"blend weights must be >= 0 and not both 0, got towers={self.towers}, cf={self.cf}")


@dataclass
class FoldedBlend:
    """The blend of one or many users, folded into per-user factors (``[U]`` arrays, or
    scalars for one user) so that ranking costs two dot products per candidate:

        score = tower . (tower_factor * u_tower) + tower_const
              + cf_item . (cf_factor * u_cf) + cf_factor * cf_offset + cf_const

    which is, exactly in real arithmetic, ``(w_t * z_tower + w_c * z_cf) / (w_t + w_c)``
    with ``z`` the standardised tower score and CF prediction ``u_cf . cf_item + bias +
    cf_offset``, and ``w_t`` / ``w_c`` zero where the user lacks that component. ``none``
    marks users with neither (ranked by a fallback score instead)."""

    # [U] arrays (of), or Python scalars (of_one)
    tower_factor: Any
    tower_const: Any
    cf_factor: Any
    cf_const: Any
    none: Any

    @classmethod
    def of(
        cls,
        has_tower: np.ndarray,
        has_cf: np.ndarray,
        cf_bias: np.ndarray,
        weights: BlendWeights,
        tower_scale: ScoreScale,
        cf_scale: ScoreScale,
    ) -> FoldedBlend:
        w_tower = np.where(has_tower, weights.towers, 0.0)
        w_cf = np.where(has_cf, weights.cf, 0.0)
        total = w_tower + w_cf
        none = total == 0
        total = np.where(none, 1.0, total)
        tower_factor = w_tower / (total * tower_scale.std)
        cf_factor = w_cf / (total * cf_scale.std)
        return cls(
            tower_factor,
            -tower_factor * tower_scale.mean,
            cf_factor,
            cf_factor * (np.asarray(cf_bias, np.float64) - cf_scale.mean),
            none,
        )

    @classmethod
    def of_one(
        cls,
        has_tower: bool,
        has_cf: bool,
        cf_bias: float,
        weights: BlendWeights,
        tower_scale: ScoreScale,
        cf_scale: ScoreScale,
    ) -> FoldedBlend:
        """The same for one user, with Python floats (a lone request's few operations)."""
        w_tower, w_cf = weights.towers * has_tower, weights.cf * has_cf
        total = (w_tower + w_cf) or 1.0
        tower_factor, cf_factor = w_tower / (total * tower_scale.std), w_cf / (total * cf_scale.std)
        return cls(
            tower_factor,
            -tower_factor * tower_scale.mean,
            cf_factor,
            cf_factor * (cf_bias - cf_scale.mean),
            w_tower + w_cf == 0,
        )
