"""``train_and_publish``: what ``make train index`` runs, as one library call.

``make train`` trains CF with the ``topn`` preset (implicit top-N retrieval) and the
towers with the softmax objective, on all of the given data, with the ``[cf]`` /
``[towers]`` settings, and the learned ranker (``[ranker]``, :mod:`index_builder.ranker`);
``make index`` builds and publishes the bundle with the ``[index]`` settings. The demo,
``tandem eval-pipeline`` and any program that wants a served bundle from its own data
call this instead of repeating those steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.data import Dataset
from engine.data.feedback import FEEDBACK_LOG, with_root_feedback
from engine.errors import TandemError
from engine.index.milvus_index import MilvusTarget
from engine.models import distributed
from engine.models.artifacts import record_trained_on
from engine.models.cf import PRESETS as CF_PRESETS
from engine.models.cf import CFConfig, CFModel, train_cf
from engine.models.ranker import Ranker
from engine.models.towers import PRESETS as TOWER_PRESETS
from engine.models.towers import TowerConfig, TwoTowerModel, train_two_tower
from engine.settings import FeedbackConfig, IndexConfig, RankerConfig, from_known_settings
from index_builder.build import build_bundle
from index_builder.ranker import RankerExamples, fit_ranker, ranker_examples, rating_model

# CF for top-N on implicit data (the wmse objective by ALS) and the towers' in-batch
# softmax (engine.models.cf.PRESETS, engine.models.towers.PRESETS): each preset wins over
# its section, as `tandem train-cf --preset topn` / `train-towers --preset retrieval` do.
CF_RETRIEVAL_PRESET = "topn"
TOWER_RETRIEVAL_PRESET = "retrieval"


def retrieval_settings(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The settings ``model`` ("cf" or "towers") is trained with for serving, over its
    section: the retrieval preset, then ``[retrieval.<model>]`` (what ``tandem tune``
    writes) over it. ``make train``'s ``--preset topn`` / ``--preset retrieval`` and
    :func:`retrieval_configs` both take them from here."""
    preset = CF_PRESETS[CF_RETRIEVAL_PRESET] if model == "cf" else TOWER_PRESETS[TOWER_RETRIEVAL_PRESET]
    return {**preset, **config.get("retrieval", {}).get(model, {})}


def retrieval_configs(config: dict[str, Any], progress: bool = False) -> tuple[CFConfig, TowerConfig]:
    """The settings of the models trained for serving: each section (``[cf]``,
    ``[towers]``) with :func:`retrieval_settings` over it."""
    cf = {**config["cf"], **retrieval_settings(config, "cf"), "progress": progress}
    towers = {**config["towers"], **retrieval_settings(config, "towers"), "progress": progress}
    return CFConfig.from_dict(cf), TowerConfig.from_dict(towers)


def train_and_publish(
    train: Dataset,
    root: str | Path,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    models_dir: str | Path | None = None,
    log=print,
    examples: RankerExamples | None = None,
) -> Path:
    """Train every model for serving on ``train`` plus the events recorded live at
    ``root`` so far (:func:`with_recorded_feedback`; :func:`train_models`) and publish a
    bundle under ``root`` (it becomes ``current``; it replays the events recorded after
    them); returns the published version's directory. ``config``: the effective
    configuration (:func:`engine.config.load_config`; default: ``./tandem.toml`` when
    present, else the defaults)."""
    if config is None:
        from engine.config import load_config

        config = load_config()
    if distributed.world()[1] > 1:
        raise TandemError("train_and_publish runs on one process (train_models alone runs as a rank of N)")
    train = with_recorded_feedback(train, root, config, log=log)
    cf, towers, ranker = train_models(train, config, progress, models_dir, log, examples)
    assert cf is not None  # one process: rank 0, which trains every model
    if models_dir is not None:
        save_feedback_cutoff(models_dir, root, train)
    return publish(train, cf, towers, root, config, ranker, log)


# ------------------------------------------------------------ live feedback
# In a models directory: the bundle root's feedback log and the byte offset the models'
# training data read it to, so that `make index` rebuilds the same data.
FEEDBACK_CUTOFF = "feedback.json"


def with_recorded_feedback(
    dataset: Dataset, root: str | Path, config: dict[str, Any], end: int | None = None, log=print
) -> Dataset:
    """``dataset`` plus the events of ``<root>/feedback.jsonl`` up to byte ``end`` (default:
    all of it now), by the ``[engine.feedback]`` rules (:mod:`engine.data.feedback`)."""
    rules = from_known_settings(FeedbackConfig, config["engine"]["feedback"], "engine.feedback")
    return with_root_feedback(dataset, root, rules, end, log)


def save_feedback_cutoff(models_dir: str | Path, root: str | Path, dataset: Dataset) -> None:
    """Record beside the models which log, and how much of it, their data included."""
    path = Path(models_dir) / FEEDBACK_CUTOFF
    path.parent.mkdir(parents=True, exist_ok=True)
    cutoff = {"log": str(Path(root) / FEEDBACK_LOG), "offset": dataset.feedback_offset}
    path.write_text(json.dumps({**cutoff, "fingerprint": dataset.fingerprint()}) + "\n")


def with_models_feedback(
    dataset: Dataset, models_dir: str | Path, config: dict[str, Any], trained_on: str | None = None, log=print
) -> Dataset:
    """``dataset`` plus the events the models in ``models_dir`` were trained with (the
    cut-off :func:`save_feedback_cutoff` recorded; none without one). ``trained_on``: the
    data fingerprint a model of the directory records; when it is not the one the
    cut-off was taken for (a model retrained since, e.g. by ``tandem train-cf``), no
    events are added."""
    path = Path(models_dir) / FEEDBACK_CUTOFF
    if not path.is_file():
        return dataset
    cutoff = json.loads(path.read_text())
    if not cutoff.get("offset") or (trained_on is not None and trained_on != cutoff.get("fingerprint")):
        return dataset
    return with_recorded_feedback(dataset, Path(cutoff["log"]).parent, config, int(cutoff["offset"]), log)


def train_models(
    train: Dataset,
    config: dict[str, Any],
    progress: bool = False,
    models_dir: str | Path | None = None,
    log=print,
    examples: RankerExamples | None = None,
) -> tuple[CFModel | None, TwoTowerModel, Ranker | None]:
    """What ``make train`` runs (``tandem train``): with ``ranker.enabled`` (the default)
    the learned ranker first, on held-out interactions (:mod:`index_builder.ranker`; from
    ``examples`` when given), then CF and the towers on all of ``train``. With
    ``models_dir`` each is saved there (``<models_dir>/cf``, ``/towers``, ``/ranker``), where
    ``make index`` rebuilds from.

    As one rank of N (``torchrun ... -m engine train --distributed``,
    :mod:`engine.models.distributed`), every rank trains the towers (and CF with the
    Adam solver) data-parallel, in the same order; rank 0 alone does the rest (ALS, the
    ranker's examples and trees) and saves. The other ranks return ``None`` for what they
    did not make."""
    ranker = train_ranker(train, config, models_dir, log, examples) if config["ranker"]["enabled"] else None
    cf, towers = train_embedding_models(train, config, progress, models_dir, log)
    return cf, towers, ranker


def train_ranker(
    train: Dataset,
    config: dict[str, Any],
    models_dir: str | Path | None = None,
    log=print,
    examples: RankerExamples | None = None,
) -> Ranker | None:
    """The learned ranker of the models ``config`` trains (:mod:`index_builder.ranker`),
    fitted on ``examples`` when given; saved to ``<models_dir>/ranker`` with ``models_dir``."""
    ranker_config = RankerConfig.from_dict(config["ranker"])
    if examples is None:
        examples = ranker_examples(train, config, ranker_config, log=log)
    if examples is None:  # a rank other than 0: it trained its share of the models
        return None
    ranker = fit_ranker(examples, ranker_config, log=log)
    if ranker.rating is not None:
        # The trees learned the predictions of a rating model on interactions it never
        # saw; served, it predicts items the user has not rated either, from all of the
        # data, as the other served models do (ML-100K u1/u2 Recall@10 +0.010/+0.001).
        ranker.rating = rating_model(train, config, ranker_config)
    if models_dir is not None:
        ranker.save(Path(models_dir) / "ranker")
    return ranker


def train_embedding_models(
    train: Dataset, config: dict[str, Any], progress: bool = False, models_dir: str | Path | None = None, log=print
) -> tuple[CFModel | None, TwoTowerModel]:
    """CF and the towers with their serving settings (:func:`retrieval_configs`). As one
    rank of N (see :func:`train_models`): the towers, and CF with the Adam solver, are
    trained by every rank together; ALS (closed form, not data-parallel) by rank 0 alone,
    which alone saves; the other ranks get ``None`` for CF then."""
    cf_config, tower_config = retrieval_configs(config, progress)
    rank, size = distributed.world()
    log(f"training CF ({cf_config.loss}, {cf_config.solver}) and towers ({tower_config.objective}) on {train.name} ...")
    cf = train_cf(train, cf_config) if rank == 0 or cf_config.solver == "adam" else None
    towers = train_two_tower(train, tower_config)
    for model, name in ((cf, "cf"), (towers, "towers")):
        if model is None:
            continue
        record_trained_on(model, train)
        if models_dir is not None and rank == 0:
            model.save(Path(models_dir) / name)
    return cf, towers


def publish(
    train: Dataset,
    cf: CFModel,
    towers: TwoTowerModel,
    root: str | Path,
    config: dict[str, Any],
    ranker: Ranker | None = None,
    log=print,
) -> Path:
    """Build and publish the bundle of trained models with the ``[index]`` settings."""
    index = IndexConfig(**config["index"])
    return build_bundle(
        train,
        cf,
        towers,
        root,
        factory=index.factory or None,
        recall_floor=index.recall_floor,
        k=index.recall_k,
        keep=index.keep,
        exact_below=index.exact_below,
        user_top_k=index.user_top_k,
        ranker=ranker,
        milvus=MilvusTarget.of(index.milvus_uri, index.milvus_db) if index.backend == "milvus" else None,
        log=log,
    )
