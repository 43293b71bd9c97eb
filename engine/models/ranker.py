"""The learned ranker: gradient-boosted trees (LightGBM, ``lambdarank``) that order a
user's candidates by the features of :mod:`engine.serving.features`.

It is trained on interactions held out from the training data, over the candidates the
retrieval stage itself proposes (``index_builder.ranker``), and stored in the bundle as
LightGBM's own text model plus a JSON file — nothing pickled — checksummed with the
rest. Serving re-scores each user's best ``depth`` candidates by the blend (phased
ranking: the blend is the cheap first phase, the trees the second), and explains a
recommendation by each feature's contribution to its score (LightGBM's SHAP values).

On explicit data a ranker carries its **rating model** (``rating``, in ``rating/``): CF
with history factors (``loss = "mse"``), whose predicted rating of a candidate is the
``rating_prediction`` feature — whether the user will like an item, beside the retrieval
scores' whether they will pick it. The examples read one trained with the ranker's own
models (on the interactions they see); the served one is trained on all of the data,
as the other served models are (``index_builder.train.train_ranker``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import TandemError
from engine.models.artifacts import read_model_meta
from engine.models.tree_scoring import CompiledTrees
from engine.settings import RankerConfig

if TYPE_CHECKING:
    from engine.models.cf import CFModel

FORMAT_VERSION = 1
MODEL_FILE, META_FILE = "ranker.txt", "ranker.json"  # META_FILE: read by artifacts.read_model_meta
RATING_DIR = "rating"  # the rating model's directory inside the ranker's (CFModel.save)


def _lightgbm():
    try:
        import lightgbm
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise TandemError("the learned ranker needs lightgbm (pip install lightgbm)") from e
    return lightgbm


class Ranker:
    """A trained ranker: ``predict`` scores feature rows, ``contributions`` explains them."""

    def __init__(
        self,
        booster,
        feature_names: list[str],
        groups: dict[str, str],
        depth: int,
        metrics: dict,
        rating: CFModel | None = None,
    ):
        self.booster, self.feature_names, self.groups = booster, list(feature_names), dict(groups)
        self.depth, self.metrics = int(depth), dict(metrics)
        self.rating = rating  # the rating model behind the rating_prediction feature (see the module)
        if (rating is not None) != ("rating_prediction" in self.feature_names):
            raise TandemError(
                f"the ranker's features and its rating model ({RATING_DIR}/) disagree: it reads "
                "rating_prediction exactly when it has one"
            )
        if booster.num_feature() != len(self.feature_names):
            raise TandemError(
                f"the ranker's model has {booster.num_feature()} features, its metadata names {len(feature_names)}"
            )
        # Served by compiled code with LightGBM's exact decisions (engine.models.tree_scoring):
        # LightGBM's predict call alone costs more than a lone request's budget.
        self.trees = CompiledTrees(booster)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        group_sizes: np.ndarray,
        feature_names: list[str],
        groups: dict[str, str],
        config: RankerConfig,
        valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        rating: CFModel | None = None,
    ) -> Ranker:
        """Trees by LambdaRank on rows grouped by user (``group_sizes`` consecutive rows
        each); with ``config.early_stopping``, early-stopped on ``valid`` (features,
        labels, group sizes) by NDCG@10. ``rating``: the rating model the features'
        ``rating_prediction`` came from, kept with the trees."""
        lgb = _lightgbm()
        params: dict[str, Any] = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "num_leaves": config.num_leaves,
            "learning_rate": config.learning_rate,
            "min_data_in_leaf": config.min_data_in_leaf,
            "feature_fraction": config.feature_fraction,
            "lambda_l2": config.lambda_l2,
            "seed": config.seed,
            "deterministic": True,
            "num_threads": 1,
            "verbose": -1,
        }
        train = lgb.Dataset(features, labels, group=group_sizes, feature_name=_safe_names(feature_names))
        kwargs: dict[str, Any] = {}
        evaluated: dict = {}
        if valid is not None and len(valid[2]) and config.early_stopping:
            kwargs["valid_sets"] = [lgb.Dataset(valid[0], valid[1], group=valid[2], reference=train)]
            kwargs["callbacks"] = [
                lgb.early_stopping(max(10, config.num_trees // 10), verbose=False),
                lgb.record_evaluation(evaluated),
            ]
        booster = lgb.train(params, train, num_boost_round=config.num_trees, **kwargs)
        metrics: dict[str, Any] = {
            "n_examples": int(len(labels)),
            "n_users": int(len(group_sizes)),
            "n_positive": int((labels > 0).sum()),
            "num_trees": int(booster.num_trees()),
        }
        if evaluated:
            curve = next(iter(evaluated.values()))["ndcg@10"]
            metrics["valid_ndcg@10"] = [float(v) for v in curve]
            metrics["best_valid_ndcg@10"] = float(max(curve))
        if booster.best_iteration > 0:  # keep only the trees up to the best round
            booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
            metrics["num_trees"] = int(booster.num_trees())
        return cls(booster, feature_names, groups, config.depth, metrics, rating)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``[n]`` float32 scores of feature rows (higher is better)."""
        return self.trees.predict(features).astype(np.float32)

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """``[n, n_features]`` each feature's contribution to each row's score (SHAP
        values; the row's score is their sum plus a constant)."""
        if len(features) == 0:
            return np.zeros((0, len(self.feature_names)), np.float32)
        out = self.booster.predict(features, pred_contrib=True, num_threads=1)
        return np.asarray(out, np.float32)[:, : len(self.feature_names)]

    def importance(self) -> dict[str, float]:
        """Each feature's total gain over the trees, by name, largest first."""
        gains = self.booster.feature_importance("gain")
        return dict(sorted(zip(self.feature_names, map(float, gains)), key=lambda kv: -kv[1]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / MODEL_FILE).write_text(self.booster.model_to_string())
        meta = {
            "kind": "ranker",
            "format_version": FORMAT_VERSION,
            "feature_names": self.feature_names,
            "groups": self.groups,
            "depth": self.depth,
            "metrics": self.metrics,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        if (path / RATING_DIR).is_dir():  # a previous ranker's, which this one may not have
            shutil.rmtree(path / RATING_DIR)
        if self.rating is not None:
            self.rating.save(path / RATING_DIR)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Ranker:
        """A saved ranker: LightGBM's text model and its JSON metadata (nothing unpickled)."""
        path = Path(path)
        meta = read_model_meta(path, "ranker", "ranker", FORMAT_VERSION)
        try:
            text = (path / MODEL_FILE).read_text()
        except FileNotFoundError:
            raise TandemError(f"{path}: not a ranker directory ({MODEL_FILE} missing)") from None
        try:
            booster = _lightgbm().Booster(model_str=text)
        except Exception as e:  # lightgbm raises its own LightGBMError on a bad model text
            raise TandemError(f"{path / MODEL_FILE}: not a LightGBM model ({e})") from None
        rating = None
        if (path / RATING_DIR).is_dir():
            from engine.models.cf import CFModel

            rating = CFModel.load(path / RATING_DIR)
        try:
            return cls(booster, meta["feature_names"], meta["groups"], meta["depth"], meta.get("metrics", {}), rating)
        except TandemError as e:  # (the constructor's checks, with the directory named)
            raise TandemError(f"{path}: {e}") from None

    def to_summary(self) -> dict:
        return {"depth": self.depth, "features": self.feature_names, **self.metrics}


def _safe_names(names: list[str]) -> list[str]:
    """LightGBM refuses some characters in feature names (":" among them)."""
    return [name.replace(":", "__") for name in names]
