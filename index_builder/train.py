"""``train_and_publish``: what ``make train index`` runs, as one library call.

``make train`` trains CF with the ``topn`` preset (implicit top-N retrieval) and the
towers with the softmax objective, on all of the given data, with the ``[cf]`` /
``[towers]`` settings; ``make index`` builds and publishes the bundle with the
``[index]`` settings. The demo, ``tandem eval-pipeline`` and any program that wants a
served bundle from its own data call this instead of repeating those steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data import Dataset
from engine.models.artifacts import record_trained_on
from engine.models.cf import PRESETS, CFConfig, train_cf
from engine.models.towers import TowerConfig, train_two_tower
from engine.settings import IndexConfig
from index_builder.build import build_bundle

# CF for top-N on implicit data: the wmse objective (see engine.models.cf.PRESETS); the
# preset wins over the [cf] section, as `tandem train-cf --preset topn` does.
CF_RETRIEVAL_PRESET = "topn"
TOWER_OBJECTIVE = "softmax"


def train_and_publish(
    train: Dataset,
    root: str | Path,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    models_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Train both models on ``train`` and publish a bundle under ``root`` (it becomes
    ``current``); returns the published version's directory. ``config``: the effective
    configuration (:func:`engine.config.load_config`; default: ``./tandem.toml`` when
    present, else the defaults). With ``models_dir`` the models are also saved there
    (``<models_dir>/cf``, ``/towers``), as ``make train`` saves them, so that a later
    ``make index`` rebuilds from them."""
    if config is None:
        from engine.config import load_config

        config = load_config()
    cf_config = CFConfig.from_dict({**config["cf"], **PRESETS[CF_RETRIEVAL_PRESET], "progress": progress})
    tower_config = TowerConfig.from_dict({**config["towers"], "objective": TOWER_OBJECTIVE, "progress": progress})
    log(f"training CF ({cf_config.loss}) and towers ({TOWER_OBJECTIVE}) on {train.name} ...")
    cf = train_cf(train, cf_config)
    towers = train_two_tower(train, tower_config)
    for model, name in ((cf, "cf"), (towers, "towers")):
        record_trained_on(model, train)
        if models_dir is not None:
            model.save(Path(models_dir) / name)
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
        log=log,
    )
