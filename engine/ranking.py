"""Exact ranking: top-k selection, and the blend of a candidate's two-tower score and
CF prediction, each standardised with statistics fixed per bundle, with configurable
weights.

Standardising with bundle-wide statistics (not per request) keeps a pair's score the
same whatever else is being ranked, so ``score`` of a few items, ``recommend`` and
``recommend_batch`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def top_k_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first (ties by lower index)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


@dataclass
class ScoreScale:
    """Mean and standard deviation of one score over (user, item) pairs of the bundle."""

    mean: float
    std: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (scores - self.mean) / self.std

    @classmethod
    def fit(cls, samples: np.ndarray) -> "ScoreScale":
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


def blend(tower_scores: np.ndarray | None, cf_scores: np.ndarray | None, fallback: np.ndarray,
          weights: BlendWeights, tower_scale: ScoreScale, cf_scale: ScoreScale) -> np.ndarray:
    """Final scores ``[n]``: the weighted mean of the available standardised components,
    or ``fallback`` (e.g. standardised popularity) when the user has neither."""
    parts, total = [], 0.0
    if tower_scores is not None and weights.towers > 0:
        parts.append(weights.towers * tower_scale(tower_scores))
        total += weights.towers
    if cf_scores is not None and weights.cf > 0:
        parts.append(weights.cf * cf_scale(cf_scores))
        total += weights.cf
    if not parts:
        return np.asarray(fallback, np.float32)
    return (sum(parts) / total).astype(np.float32)
