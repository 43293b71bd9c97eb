"""``tandem build-index / rollback``: publish a bundle from the trained models, or step back a version."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli.common import add_data_file_flags, join_ranks, log_to_stderr, say_parts_read
from engine.config import load_dataset
from engine.errors import ConfigError


def cmd_build_index(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import CFModel
    from engine.models.towers import TwoTowerModel
    from index_builder.train import publish, with_models_feedback

    models = Path(args.models or config["paths"]["models"])
    for sub, name in (("cf", "cf.json"), ("towers", "towers.json")):
        if not (models / sub / name).is_file():
            raise ConfigError(
                f"{models / sub}: no trained model; run `make train` (or tandem train-cf / "
                f"train-towers --split none) first"
            )
    cf, towers = CFModel.load(models / "cf"), TwoTowerModel.load(models / "towers")
    ranker = None
    if config["ranker"]["enabled"] and (models / "ranker").is_dir():  # tandem train-ranker's
        from engine.models.ranker import Ranker

        ranker = Ranker.load(models / "ranker")
    # The data the models were trained on: the events recorded live they included too.
    trained_on = cf.metrics.get("trained_on", {}).get("fingerprint")
    dataset = with_models_feedback(load_dataset(config, args.data), models, config, trained_on, log=log_to_stderr)
    root = Path(args.out or config["paths"]["bundles"])
    # The [index] settings, with this command's flags over them.
    flags = {"factory": args.factory, "recall_floor": args.recall_floor, "keep": args.keep}
    index = {**config["index"], **{key: value for key, value in flags.items() if value is not None and value != ""}}
    print(f"building indexes for {dataset.name} ({dataset.n_items:,} items) into {root}", file=sys.stderr)
    published = publish(dataset, cf, towers, root, {**config, "index": index}, ranker, log=log_to_stderr)
    print(json.dumps({"published": str(published), "version": published.name}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace, config: dict) -> int:
    from engine.models.distributed import world
    from index_builder.train import save_feedback_cutoff, train_models, with_recorded_feedback

    # One rank of `torchrun --nproc_per_node N -m engine train --distributed`, or one process.
    rank = join_ranks(config["towers"].get("device")) if args.distributed else 0
    root = Path(config["paths"]["bundles"])  # the events recorded live there so far are trained on
    # Rank 0 fits ALS and the ranker on the whole data; another rank trains its users'
    # share of the towers (and of Adam CF), and reads only its parts of a sharded directory.
    shard = (0, 1) if rank == 0 else world()
    dataset = load_dataset(config, args.data, shard)
    say_parts_read(dataset, args.data)
    dataset = with_recorded_feedback(dataset, root, config, log=log_to_stderr)
    models = Path(args.models or config["paths"]["models"])
    log = log_to_stderr if rank == 0 else lambda line: None
    _, _, ranker = train_models(dataset, config, not args.no_progress and rank == 0, models, log=log)
    if rank != 0:  # rank 0 alone writes
        return 0
    save_feedback_cutoff(models, root, dataset)
    saved = ["cf", "towers"] + (["ranker"] if ranker is not None else [])
    print(json.dumps({"saved": str(models), "models": sorted(saved)}, indent=2))
    return 0


def cmd_train_ranker(args: argparse.Namespace, config: dict) -> int:
    from index_builder.train import train_ranker, with_models_feedback

    models = Path(args.models or config["paths"]["models"])
    dataset = with_models_feedback(load_dataset(config, args.data), models, config, log=log_to_stderr)
    ranker = train_ranker(dataset, config, models, log=log_to_stderr)
    assert ranker is not None  # one process: train_ranker returns None only to ranks other than 0
    top = list(ranker.importance().items())[:5]
    summary = {"saved": str(models / "ranker"), **ranker.to_summary(), "top_features_by_gain": dict(top)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_publish(args: argparse.Namespace, config: dict) -> int:
    from index_builder.train import train_and_publish

    dataset = load_dataset(config, args.data)
    models = Path(args.models or config["paths"]["models"])
    root = Path(args.out or config["paths"]["bundles"])
    published = train_and_publish(
        dataset,
        root,
        config,
        progress=not args.no_progress,
        models_dir=models,
        log=log_to_stderr,
    )
    print(json.dumps({"published": str(published), "version": published.name, "models": str(models)}, indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace, config: dict) -> int:
    from engine.index import bundle

    root = Path(args.root or config["paths"]["bundles"])
    before = bundle.current_version(root)
    after = bundle.rollback(root)
    print(f"rolled back {root}/current: {before} -> {after}")
    return 0


def _add_data_and_models_flags(
    parser: argparse.ArgumentParser, models: str, data: str = "dataset path or 'synthetic'"
) -> None:
    """``--data`` (with the data file flags) and ``--models``: what every command of
    this group that trains or indexes reads."""
    parser.add_argument("--data", metavar="PATH", help=f"{data} (default: data.source)")
    add_data_file_flags(parser)
    parser.add_argument("--models", metavar="DIR", help=f"{models} (default: paths.models)")


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    publish = commands.add_parser(
        "publish",
        help="train CF and the towers on all of the data and publish a bundle (make train index in one command)",
        description="index_builder.train_and_publish: CF with the topn preset over [cf], the towers with the "
        "softmax objective over [towers], on all of the configured data, and the learned ranker ([ranker]); "
        "the models are saved to <paths.models> "
        "(as make train saves them) and a bundle is built with the [index] settings and published as "
        "<paths.bundles>/current.",
    )
    _add_data_and_models_flags(publish, "where to save the trained models")
    publish.add_argument("--out", metavar="DIR", help="bundle root (default: paths.bundles)")
    publish.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    publish.set_defaults(handler=cmd_publish)

    build = commands.add_parser(
        "build-index",
        help="build the FAISS indexes from the trained models and publish a bundle",
        description="Export item vectors from the latest trained models (<paths.models>/cf and /towers, "
        "no retraining), build and recall-check the indexes, and publish a new bundle version "
        "atomically as <paths.bundles>/current.",
    )
    _add_data_and_models_flags(build, "trained models directory", data="the dataset the models were trained on")
    build.add_argument("--out", metavar="ROOT", help="bundle root (default: paths.bundles)")
    build.add_argument("--factory", help="FAISS factory string for every index (default: by catalogue size)")
    build.add_argument("--recall-floor", type=float, help="refuse to publish below this recall@k (default 0.95)")
    build.add_argument("--keep", type=int, help="versions to keep (default 5)")
    build.set_defaults(handler=cmd_build_index)

    train = commands.add_parser(
        "train",
        help="train every model for serving on all of the data (what make train runs): CF, towers, ranker",
        description="index_builder.train.train_models: the learned ranker ([ranker], on held-out interactions), "
        "then CF with the topn preset over [cf] and the towers with the retrieval preset over [towers], on all "
        "of the configured data, saved to <paths.models> for build-index (make index). tandem train-cf / "
        "train-towers / train-ranker do each step alone.",
    )
    _add_data_and_models_flags(train, "where to save the models")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of `torchrun --nproc_per_node N -m engine train --distributed` (make train DIST=N): the "
        "towers, and CF with the Adam solver, data-parallel on N processes; rank 0 does the rest and saves",
    )
    train.set_defaults(handler=cmd_train)

    train_ranker = commands.add_parser(
        "train-ranker",
        help="train the learned ranker on held-out interactions, for the next build-index (make train does)",
        description="index_builder.ranker: hold out each user's latest [ranker] holdout_fraction of the data "
        "(random without timestamps), train CF and the towers on the rest as make train does, retrieve each "
        "held-out user's candidates as the engine does, and fit LambdaRank trees on their features. Saved to "
        "<paths.models>/ranker, which build-index stores in the bundle.",
    )
    _add_data_and_models_flags(train_ranker, "trained models directory")
    train_ranker.set_defaults(handler=cmd_train_ranker)

    rollback = commands.add_parser("rollback", help="point the bundle root's current at the previous version")
    rollback.add_argument("--root", help="bundle root (default: paths.bundles)")
    rollback.set_defaults(handler=cmd_rollback)
