"""Training the learned ranker (:mod:`engine.models.ranker`) on the retrieval stage's
own candidates.

1. Each user's latest ``holdout_fraction`` of the training interactions is held out
   (a seeded random share of each user's when the data has no timestamps).
2. CF and the towers are trained on the rest and published to a temporary bundle, as
   ``make train index`` would; an engine serving it retrieves each held-out user's
   candidates exactly as ``recommend`` does, and the blend's best ``depth`` of them,
   with their features (:mod:`engine.serving.features`), are the examples. A candidate
   is relevant when the user's held-out interactions like it (the data's own rule:
   every interaction of implicit data, ratings of at least 4 otherwise).
   On explicit data a rating model (CF with history factors) is trained on the same
   interactions, and its predicted rating of each candidate is one more feature
   (``rating_prediction``); it is kept with the ranker and serves that feature.
3. LambdaRank trees are fitted on those users' examples (``num_trees`` of them, or
   early-stopped on a fifth of the users by NDCG@10 with ``early_stopping``).

``train_and_publish`` then trains the served models on all of the data and stores the
ranker in their bundle. The features of the served models are read by trees fitted on
models trained on less data: the ranker learns from scores on interactions no model
saw, which is what it meets when serving.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine import data
from engine.evaluation.metrics import relevant_matrix
from engine.models import distributed
from engine.models.ranker import Ranker
from engine.settings import EngineConfig, RankerConfig

if TYPE_CHECKING:
    from engine.models.cf import CFModel

VALID_SHARE = 0.2  # of the example users, for early stopping
# Share of the example users whose rating_prediction is left missing (seeded), so that
# the trees learn what to do for users the rating model does not know (new users,
# fold-in): trees that never saw it missing would read a missing value as a rating of 0.
RATING_DROPOUT = 0.1


@dataclass
class RankerExamples:
    """Rows of (user, candidate) features grouped by user, with 0/1 relevance."""

    features: np.ndarray  # [n, n_features] float32
    labels: np.ndarray  # [n] int32
    group_sizes: np.ndarray  # [n_users] rows per user, consecutive
    feature_names: list[str]
    groups: dict[str, str]  # feature name -> group (engine.serving.features)
    rating: CFModel | None = None  # the rating model the rating_prediction column came from (explicit data)

    def without(self, dropped: Sequence[str]) -> RankerExamples:
        """These examples with the features of the ``dropped`` groups missing (NaN): a
        ranker fitted on them never reads those features (the ablation)."""
        features = self.features.copy()
        for j, name in enumerate(self.feature_names):
            if self.groups[name] in dropped:
                features[:, j] = np.nan
        return RankerExamples(features, self.labels, self.group_sizes, self.feature_names, self.groups, self.rating)


def holdout_splits(train: data.Dataset, config: RankerConfig) -> list[data.Split]:
    """The interactions the ranker learns to predict (``ranker.holdout``): each user's
    latest ``holdout_fraction``, or ``holdout_rounds`` seeded random shares of each
    user's ("auto": temporal when the data has timestamps; a temporal holdout is one)."""
    # (On N ranks, whether the whole data has times: every rank makes the same choice.)
    first, last = distributed.value_range(train.timestamps)
    if config.holdout == "temporal" or (config.holdout == "auto" and first != last):
        return [data.temporal_split(train, config.holdout_fraction)]
    return [
        data.random_split(train, config.holdout_fraction, seed=config.seed + r, per_user=True)
        for r in range(config.holdout_rounds)
    ]


def ranker_examples(
    train: data.Dataset,
    config: dict,
    ranker_config: RankerConfig,
    log=print,
) -> RankerExamples | None:
    """The examples of a ranker for the models ``config`` trains (see the module), from
    every holdout of :func:`holdout_splits`. As a rank other than 0 of a distributed run
    (:func:`index_builder.train.train_models`): its share of the models' training, then
    ``None``."""
    found = [
        _examples_of(fit, holdout, config, ranker_config, log) for fit, holdout in holdout_splits(train, ranker_config)
    ]
    parts = [part for part in found if part is not None]
    if not parts:
        return None
    first = parts[0]
    return RankerExamples(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.group_sizes for p in parts]),
        first.feature_names,
        first.groups,
        first.rating,  # (each holdout's examples read its own; train_ranker serves one of all the data)
    )


def _examples_of(fit: data.Dataset, holdout: data.Dataset, config: dict, ranker_config: RankerConfig, log):
    from engine.serving.engine import Engine
    from index_builder.train import publish, train_embedding_models

    log(
        f"ranker: training on {fit.n_ratings:,} interactions, "
        f"holding out {holdout.n_ratings:,} ({ranker_config.holdout_fraction:.0%} per user)"
    )
    with tempfile.TemporaryDirectory(prefix="tandem-ranker-") as root:
        quiet = lambda line: None  # noqa: E731
        cf, towers = train_embedding_models(fit, config, log=quiet)
        if distributed.world()[0] != 0 or cf is None:  # a rank of a distributed run: its share is done
            return None
        publish(fit, cf, towers, root, {**config, "index": {**config["index"], "keep": 1}}, log=quiet)
        engine = Engine.load(root, EngineConfig(**{**config["engine"], "ranking": "blend"}))
        rating = rating_model(fit, config, ranker_config)
        engine.use_rating_model(rating)
        relevant = relevant_matrix(holdout, "auto")
        users = np.flatnonzero(np.diff(relevant.indptr) > 0)
        if len(users) > ranker_config.max_users:
            rng = np.random.default_rng(ranker_config.seed)
            users = np.sort(rng.choice(users, ranker_config.max_users, replace=False))
        rows, items, features = engine.ranking_examples(
            holdout.users.ids[users].tolist(), ranker_config.depth, ranker_config.n_candidates
        )
        names, groups = engine.features.names, engine.features.groups
    if rating is not None:
        missing = np.random.default_rng(ranker_config.seed).random(len(users)) < RATING_DROPOUT
        features[missing[rows], names.index("rating_prediction")] = np.nan
    # A candidate is relevant when it is among its user's relevant held-out items.
    relevant = relevant[users].tocoo()
    n_items = np.int64(holdout.n_items)
    labels = np.isin(rows * n_items + items, relevant.row.astype(np.int64) * n_items + relevant.col).astype(np.int32)
    # Users without a relevant candidate teach LambdaRank nothing.
    sizes = np.bincount(rows, minlength=len(users))
    useful = np.bincount(rows, weights=labels, minlength=len(users)) > 0
    keep = useful[rows]
    log(
        f"ranker: {int(useful.sum()):,} of {len(users):,} held-out users have a relevant item "
        f"among their {ranker_config.depth} best candidates"
    )
    return RankerExamples(features[keep], labels[keep], sizes[useful], names, groups, rating)


def rating_model(fit: data.Dataset, config: dict, ranker_config: RankerConfig) -> CFModel | None:
    """A ranker's rating model trained on ``fit`` (explicit data, with
    ``ranker.rating_model``; else None): CF for ratings (mse, history factors) on the
    ``[cf]`` section's device, with larger batches than B1's defaults — the trees need
    its ordering, not its last digits: ML-100K u1-u5 RMSE 0.905 in 0.8 s a fold against
    0.902 in 2.6 s. Rank 0 of a distributed run trains it alone."""
    if fit.implicit or not ranker_config.rating_model:
        return None
    from engine.models.cf import CFConfig, train_cf

    settings = CFConfig(
        batch_size=4096,
        learning_rate=0.008,
        device=config["cf"].get("device", "cpu"),
        seed=ranker_config.seed,
        progress=False,
    )
    with distributed.alone():
        return train_cf(fit, settings)


def fit_ranker(examples: RankerExamples, config: RankerConfig, without: Sequence[str] = (), log=print) -> Ranker:
    """LambdaRank trees on ``examples`` (minus the feature groups ``without``); with
    ``early_stopping``, early-stopped on a seeded fifth of the users."""
    if without:
        examples = examples.without(without)
    n_users = len(examples.group_sizes)
    if n_users == 0:
        raise ValueError("no held-out user has a relevant candidate: too little data to train a ranker")
    rng = np.random.default_rng(config.seed)
    valid_users = np.zeros(n_users, bool)
    if config.early_stopping and n_users >= 10:
        valid_users[rng.choice(n_users, max(1, int(n_users * VALID_SHARE)), replace=False)] = True
    row_valid = np.repeat(valid_users, examples.group_sizes)
    ranker = Ranker.fit(
        examples.features[~row_valid],
        examples.labels[~row_valid],
        examples.group_sizes[~valid_users],
        examples.feature_names,
        examples.groups,
        config,
        valid=(examples.features[row_valid], examples.labels[row_valid], examples.group_sizes[valid_users]),
        rating=examples.rating,
    )
    best = ranker.metrics.get("best_valid_ndcg@10")
    log(
        f"ranker: {ranker.metrics['num_trees']} trees on {ranker.metrics['n_examples']:,} examples"
        + (f", validation NDCG@10 {best:.4f}" if best is not None else "")
    )
    return ranker
