"""``tandem tune``: fit the settings that matter to your own data, on a validation split
carved from that data only.

Each trial (Optuna's TPE sampler, seeded) draws CF settings (factors, regularisation,
confidence weighting of the interaction values, iterations), tower settings (layer sizes,
temperature, epochs), the ranking blend and the learned ranker (trees, leaves, minimum
leaf size, learning rate, how many candidates it re-scores), then scores them in two
stages:

1. train CF alone and measure its NDCG@k on the validation users — a trial whose CF is
   already worse than the median of earlier trials at this stage is pruned (stopped
   early, Optuna's median rule) before the towers are trained;
2. train the towers, publish a bundle as ``make train index`` would
   (:func:`~index_builder.train.train_and_publish`), and measure the whole pipeline's
   NDCG@k (:func:`~engine.evaluation.pipeline.evaluate_engine`).

The validation split is each user's latest ``validation_fraction`` of interactions when
the data has timestamps, else a seeded per-user random share: never the test data of an
evaluation. The best settings are written to a TOML file (``paths.tuned``) that
:func:`engine.config.load_config` merges over ``tandem.toml`` whenever it is present, so
``make train`` / ``make publish`` / ``train_and_publish`` use them; each trial is logged
as a JSON line beside it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine import data
from engine.config import merged
from engine.errors import TandemError
from engine.evaluation.offline import topn_metrics
from engine.evaluation.pipeline import evaluate_engine
from engine.models.cf import train_cf
from engine.serving.engine import Engine
from engine.settings import EngineConfig
from index_builder.train import retrieval_configs, train_and_publish

# Validation users scored per trial at most (a seeded sample): trials stay quick on
# large data, and the figure is still an average over thousands of users.
MAX_VALIDATION_USERS = 2000


def validation_split(dataset: data.Dataset, fraction: float = 0.2, seed: int = 0) -> data.Split:
    """The split tune scores on: temporal when the data has timestamps (more than one
    distinct value), else a seeded per-user random share."""
    if dataset.has_timestamps:
        return data.temporal_split(dataset, fraction)
    return data.random_split(dataset, fraction, seed=seed, per_user=True)


def suggest(trial) -> dict[str, Any]:
    """One trial's settings, as configuration sections (``retrieval.cf``,
    ``retrieval.towers``: over the serving presets; ``engine``: the blend; ``ranker``)."""
    cf: dict[str, Any] = {
        "n_features": trial.suggest_categorical("cf.n_features", [16, 32, 64, 128]),
        "lambda_": trial.suggest_float("cf.lambda", 0.5, 200.0, log=True),
        "als_iterations": trial.suggest_int("cf.als_iterations", 6, 20),
        "confidence": trial.suggest_categorical("cf.confidence", ["constant", "log"]),
        "attribute_prior": trial.suggest_categorical("cf.attribute_prior", [True, False]),
    }
    if cf["confidence"] == "constant":
        cf["positive_weight"] = trial.suggest_float("cf.positive_weight", 1.2, 30.0, log=True)
    else:
        cf["alpha"] = trial.suggest_float("cf.alpha", 0.1, 30.0, log=True)
    layers = trial.suggest_categorical("towers.hidden_layers", ["128", "256,128", "512,256"])
    towers = {
        "hidden_layers": [int(x) for x in layers.split(",")],
        "output_dim": trial.suggest_categorical("towers.output_dim", [16, 32, 64]),
        "temperature": trial.suggest_float("towers.temperature", 0.02, 0.3, log=True),
        "epochs": trial.suggest_int("towers.epochs", 2, 10),
    }
    engine = {
        "blend_cf": trial.suggest_float("engine.blend_cf", 0.1, 3.0, log=True),
        "blend_popularity": trial.suggest_float("engine.blend_popularity", 0.0, 2.0),
    }
    ranker = {
        "num_trees": trial.suggest_int("ranker.num_trees", 50, 300, log=True),
        "num_leaves": trial.suggest_categorical("ranker.num_leaves", [4, 7, 15, 31]),
        "min_data_in_leaf": trial.suggest_int("ranker.min_data_in_leaf", 20, 500, log=True),
        "learning_rate": trial.suggest_float("ranker.learning_rate", 0.02, 0.2, log=True),
        "depth": trial.suggest_categorical("ranker.depth", [30, 50, 100]),
    }
    return {"retrieval": {"cf": cf, "towers": towers}, "engine": engine, "ranker": ranker}


def tune(
    dataset: data.Dataset,
    config: dict[str, Any],
    budget_minutes: float = 10.0,
    max_trials: int | None = None,
    k: int = 10,
    validation_fraction: float = 0.2,
    seed: int = 0,
    log_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search settings for ``dataset`` within ``budget_minutes`` (and ``max_trials``);
    returns ``{"best": sections, "best_ndcg", "baseline_ndcg", "trials", "split"}``. The
    first trial is the current configuration, the baseline the search must beat."""
    import optuna
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train, valid = validation_split(dataset, validation_fraction, seed)
    users = np.unique(valid.user_idx)
    if len(users) > MAX_VALIDATION_USERS:
        keep = np.random.default_rng(seed).choice(users, MAX_VALIDATION_USERS, replace=False)
        valid = valid.subset(np.isin(valid.user_idx, keep), name=valid.name)
    log(
        f"tuning on {train.name}: {train.n_ratings:,} training and {valid.n_ratings:,} validation interactions "
        f"({len(np.unique(valid.user_idx)):,} users), budget {budget_minutes:g} min"
    )
    log_file = None if log_path is None else open(log_path, "w")  # noqa: SIM115 (closed below)
    records: list[dict] = []

    def objective(trial) -> float:
        # Trial 0 is the configuration as it is: the baseline.
        sections: dict[str, Any] = {} if trial.number == 0 else suggest(trial)
        trial_config = merged(config, sections, origin=f"tune trial {trial.number}")
        started = time.perf_counter()
        cf = train_cf(train, retrieval_configs(trial_config)[0])
        assert cf is not None  # (None only on a rank other than 0 of a distributed run)
        cf_ndcg = topn_metrics(lambda u, kk: cf.recommend_indices(u, kk), valid, k)[f"ndcg@{k}"]
        trial.report(cf_ndcg, step=0)
        record: dict[str, Any] = {"trial": trial.number, "settings": sections, f"cf_ndcg@{k}": cf_ndcg}
        if trial.should_prune():
            record.update(state="pruned", seconds=time.perf_counter() - started)
            _write(record)
            raise optuna.TrialPruned()
        with tempfile.TemporaryDirectory() as root:
            train_and_publish(train, root, trial_config, log=lambda line: None)
            engine = Engine.load(root, EngineConfig(**trial_config["engine"]))
            result = evaluate_engine(engine, valid, k, min_rating="auto")
        record.update(
            state="complete",
            seconds=time.perf_counter() - started,
            **{f"ndcg@{k}": result[f"ndcg@{k}"], f"recall@{k}": result[f"recall@{k}"]},
        )
        _write(record)
        return float(result[f"ndcg@{k}"])

    def _write(record: dict) -> None:
        records.append(record)
        line = json.dumps(record, default=str)
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        score = record.get(f"ndcg@{k}")
        log(
            f"trial {record['trial']}: {record['state']} in {record['seconds']:.1f} s, "
            f"CF NDCG@{k} {record[f'cf_ndcg@{k}']:.4f}" + (f", pipeline NDCG@{k} {score:.4f}" if score else "")
        )

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    bar = tqdm(total=max_trials, desc="tune", unit="trial", disable=not progress)
    try:
        study.optimize(
            objective,
            n_trials=max_trials,
            timeout=budget_minutes * 60,
            callbacks=[lambda study, trial: bar.update(1)],
        )
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    complete = [r for r in records if r["state"] == "complete"]
    if not complete:
        raise TandemError("no trial completed within the budget: give tune more minutes (--budget)")
    best = max(complete, key=lambda r: r[f"ndcg@{k}"])
    baseline = next((r for r in complete if r["trial"] == 0), None)
    return {
        "best": best["settings"],
        "best_trial": best["trial"],
        f"best_ndcg@{k}": best[f"ndcg@{k}"],
        f"baseline_ndcg@{k}": None if baseline is None else baseline[f"ndcg@{k}"],
        "trials": len(records),
        "pruned": sum(r["state"] == "pruned" for r in records),
        "split": {"train": train.name, "validation": valid.name},
        "data": {"name": dataset.name, "fingerprint": dataset.fingerprint()},
    }


def write_settings(result: dict[str, Any], path: str | Path) -> Path:
    """The tuned settings as a TOML file that :func:`engine.config.load_config` merges."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by `tandem tune`: merged over tandem.toml by every command while this file exists.",
        f"# Tuned on {result['data']['name']} (fingerprint {result['data']['fingerprint'][:12]}), "
        f"validation {result['split']['validation']}; best of {result['trials']} trials.",
    ]
    for section, values in _flat_sections(result["best"]):
        lines.append(f"\n[{section}]")
        lines += [f"{'lambda' if key == 'lambda_' else key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _flat_sections(sections: dict[str, Any], prefix: str = ""):
    """``(dotted section name, its scalar settings)`` of nested sections."""
    scalars = {key: value for key, value in sections.items() if not isinstance(value, dict)}
    if scalars:
        yield prefix, scalars
    for key, value in sections.items():
        if isinstance(value, dict):
            yield from _flat_sections(value, f"{prefix}.{key}" if prefix else key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot write {value!r} as a setting")
    return repr(value)
