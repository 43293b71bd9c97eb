"""``tandem train-cf / eval-cf / train-towers / eval-towers``: train a model on a split, save
it, report its test metrics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli.common import add_data_flags, join_ranks, say_parts_read
from engine.config import load_dataset, load_split, resolve_data_source
from engine.data.shards import is_sharded
from engine.errors import ConfigError
from engine.models.artifacts import record_trained_on

# Flags that set a model setting of the same name. Unset flags fall back on
# tandem.toml's [cf] / [towers] sections, then the defaults.
CF_FLAGS = (
    "n_features",
    "lambda_",
    "learning_rate",
    "epochs",
    "batch_size",
    "loss",
    "device",
    "seed",
    "negative_sampling",
    "negative_ratio",
)


def _model_config(config_class, section: str, config: dict, args: argparse.Namespace, flags, extra: dict | None = None):
    """A model config from the file's section, overridden by the command's flags."""
    settings = {**config[section], **(extra or {})}
    settings.update({key: getattr(args, key) for key in flags if getattr(args, key) is not None})
    if args.no_progress:
        settings["progress"] = False
    try:
        return config_class.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from None


def _train_and_test(args: argparse.Namespace, config: dict, shard: tuple[int, int] = (0, 1)):
    """The (train, test-or-None) pair the data/split flags and configuration name. A
    rank ``shard[0]`` of ``shard[1]`` reads only its parts of a sharded directory
    (``tandem data shard``), and trains on all of them."""
    source = resolve_data_source(args.data or config["data"]["source"])
    if shard[1] > 1 and is_sharded(source):
        spec = args.split or config["data"]["split"]
        if spec not in ("auto", "none"):
            raise ConfigError(
                f"split {spec!r}: each rank reads only its parts of the sharded directory {source} and trains on "
                "all of them; shard a training part instead (tandem data shard of the data you train on), with "
                "--split none"
            )
        dataset = load_dataset(config, source, shard)
        say_parts_read(dataset, source)
        return dataset, None
    split = load_split(config, args.data, args.split)
    if split is None:
        return load_dataset(config, args.data), None
    return split.train, split.test


def _check_trained_on(model, train, test) -> None:
    """Refuse to evaluate a model on a split whose training part is not the data it was
    trained on: its test part may then hold the model's own training data (after
    ``make train``, which trains on everything, every test interaction), and the figures
    would be inflated or meaningless."""
    trained_on = model.metrics.get("trained_on")
    if trained_on is None:
        print("warning: the model does not record what it was trained on; it may have seen the test data",
              file=sys.stderr)  # fmt: skip
        return
    if trained_on["fingerprint"] != train.fingerprint():
        raise ConfigError(
            f"the model was trained on {trained_on['data']} ({trained_on['n_ratings']:,} ratings), not on this "
            f"split's training part {train.name} ({train.n_ratings:,} ratings): on {test.name} it would be scored "
            "on data it may have been trained on. Evaluate it with the data and split it was trained on, or train "
            "it on this split (tandem train-cf / train-towers --split ...)."
        )


def _min_rating(args: argparse.Namespace) -> float | str:
    """The relevance threshold of the top-N metrics: --min-rating, else the data's rule."""
    return "auto" if args.min_rating is None else args.min_rating


def _cf_report(model, test, k: int, min_rating: float | str | None = "auto") -> dict:
    from engine.evaluation.offline import check_aligned, rating_metrics, topn_metrics

    check_aligned(model.users, model.items, test)
    report = {"model": "cf", "loss": model.config.loss, "test": test.name, "n_test_ratings": test.n_ratings}
    if model.config.loss == "mse":
        report.update(rating_metrics(model.predict_indices, test, clip=model.rating_range))
    report.update(topn_metrics(lambda users, kk: model.recommend_indices(users, kk), test, k=k, min_rating=min_rating))
    return report


def cmd_train_cf(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import PRESETS, CFConfig, train_cf
    from index_builder.train import CF_RETRIEVAL_PRESET, retrieval_settings

    preset = dict(PRESETS[args.preset]) if args.preset else {}
    if args.preset == CF_RETRIEVAL_PRESET:  # serving's CF: [retrieval.cf] (tandem tune) over the preset
        preset = retrieval_settings(config, "cf")
    cf_config = _model_config(CFConfig, "cf", config, args, CF_FLAGS, preset)
    if args.distributed and cf_config.solver != "adam":
        raise ConfigError(f"--distributed trains the Adam solver; this configuration uses {cf_config.solver!r}")
    shard = _rank_zero(args, config, train_cf, cf_config) if args.distributed else (0, 1)
    if shard is None:
        return 0
    return _fit_report_save(
        args,
        config,
        "cf",
        "CF",
        train_cf,
        cf_config,
        lambda model, train, test: _cf_report(model, test, args.k, _min_rating(args)),
        shard,
    )


def _rank_zero(args: argparse.Namespace, config: dict, fit, model_config) -> tuple[int, int] | None:
    """``--distributed``: join torchrun's process group. Rank 0 goes on to evaluate, save
    and print: it gets its ``(rank, size)``, which reads only its parts of a sharded
    directory. Every other rank trains its share here and is done: None."""
    from engine.models.distributed import world

    join_ranks(model_config.device)
    rank, size = world()
    if rank != 0:
        train, _ = _train_and_test(args, config, (rank, size))
        fit(train, model_config)
        return None
    return rank, size


def _fit_report_save(
    args: argparse.Namespace,
    config: dict,
    subdir: str,
    label: str,
    fit,
    model_config,
    report,
    shard: tuple[int, int] = (0, 1),
) -> int:
    """Train on the split's train part, evaluate on its test part (if any), save the model
    (default <paths.models>/<subdir>) with its learning curve, and print the metrics."""
    train, test = _train_and_test(args, config, shard)
    out = Path(args.out or Path(config["paths"]["models"]) / subdir)
    print(
        f"training {label} on {train.name}: {train.n_users:,} users, {train.n_items:,} items, "
        f"{train.n_ratings:,} ratings",
        file=sys.stderr,
    )
    model = fit(train, model_config, curve_path=out / "learning_curve.json")
    record_trained_on(model, train)
    model.save(out)  # before evaluating: a failed evaluation must not lose the model
    if test is not None:
        model.metrics["test"] = report(model, train, test)
        model.save(out)  # again, with the test metrics
    print(json.dumps({"saved": str(out), **model.metrics}, indent=2))
    return 0


def cmd_eval_cf(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import CFModel

    model = CFModel.load(args.model or Path(config["paths"]["models"]) / "cf")
    train, test = _train_and_test(args, config)
    if test is None:
        raise ConfigError("eval-cf needs a test split: --split none leaves nothing to evaluate")
    _check_trained_on(model, train, test)
    print(json.dumps(_cf_report(model, test, args.k, _min_rating(args)), indent=2))
    return 0


TOWER_FLAGS = ("objective", "learning_rate", "epochs", "batch_size", "output_dim", "temperature", "device", "seed")


def _towers_report(model, train, test, k: int, min_rating: float | str | None = "auto") -> dict:
    from engine.evaluation.offline import check_aligned, rating_metrics, topn_metrics

    check_aligned(model.users, model.items, test)
    report = {
        "model": "two_tower",
        "objective": model.config.objective,
        "test": test.name,
        "n_test_ratings": test.n_ratings,
    }
    if model.config.objective == "mse":
        report.update(rating_metrics(model.predict_rating_indices, test))
    seen = train.user_items()
    report.update(
        topn_metrics(lambda users, kk: model.recommend_indices(users, kk, seen), test, k=k, min_rating=min_rating)
    )
    return report


def cmd_train_towers(args: argparse.Namespace, config: dict) -> int:
    from engine.models.towers import PRESETS, TowerConfig, train_two_tower
    from index_builder.train import TOWER_RETRIEVAL_PRESET, retrieval_settings

    extra: dict = {}
    if args.preset == TOWER_RETRIEVAL_PRESET:  # serving's towers: [retrieval.towers] (tandem tune) over the preset
        extra.update(retrieval_settings(config, "towers"))
    elif args.preset:
        extra.update(PRESETS[args.preset])
    if args.layers is not None:
        extra["hidden_layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
    tower_config = _model_config(TowerConfig, "towers", config, args, TOWER_FLAGS, extra)
    # On N ranks the towers read only their users' parts of a sharded directory.
    shard = _rank_zero(args, config, train_two_tower, tower_config) if args.distributed else (0, 1)
    if shard is None:
        return 0
    return _fit_report_save(
        args,
        config,
        "towers",
        f"two towers ({tower_config.objective})",
        train_two_tower,
        tower_config,
        lambda model, train, test: _towers_report(model, train, test, args.k, _min_rating(args)),
        shard,
    )


def cmd_eval_towers(args: argparse.Namespace, config: dict) -> int:
    from engine.models.towers import TwoTowerModel

    model = TwoTowerModel.load(args.model or Path(config["paths"]["models"]) / "towers")
    train, test = _train_and_test(args, config)
    if test is None:
        raise ConfigError("eval-towers needs a test split: --split none leaves nothing to evaluate")
    _check_trained_on(model, train, test)
    print(json.dumps(_towers_report(model, train, test, args.k, _min_rating(args)), indent=2))
    return 0


def _add_training_flags(p: argparse.ArgumentParser, subdir: str, unit: str) -> None:
    """Data flags plus the options every trainer has."""
    add_data_flags(p)
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: <paths.models>/{subdir})")
    p.add_argument("--lr", dest="learning_rate", type=float, help="Adam learning rate")
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, help=f"{unit} per minibatch")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--distributed",
        action="store_true",
        help=f"one rank of `torchrun --nproc_per_node N -m engine train-{subdir} --distributed`: data-parallel "
        "training on N processes, each on its users' interactions (engine/models/distributed.py); from a "
        "directory of `tandem data shard`, each rank reads only its parts. Rank 0 evaluates and saves the model",
    )


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    train_cf = commands.add_parser(
        "train-cf",
        help="train the collaborative-filtering model",
        description="Train matrix factorisation on the training part of the split, save it "
        "(cf.json + cf_arrays.npz + learning curve) and print test metrics.",
    )
    _add_training_flags(train_cf, "cf", "ratings")
    train_cf.add_argument("--n-features", type=int, help="latent dimension")
    train_cf.add_argument("--lambda", dest="lambda_", type=float, help="L2 strength")
    train_cf.add_argument(
        "--preset",
        choices=["rating", "topn"],
        help="named settings over the [cf] section (flags still win): rating = B1 defaults, "
        "topn = wmse by ALS for top-N retrieval, with [retrieval.cf] over it (what make train uses for serving)",
    )
    train_cf.add_argument(
        "--loss",
        choices=["mse", "bce", "wmse"],
        help="mse (ratings), bce (binary, sampled negatives) or wmse (implicit, all pairs weighted)",
    )
    train_cf.add_argument("--negative-sampling", choices=["uniform", "popularity"], help="bce negatives")
    train_cf.add_argument("--negative-ratio", type=int, help="bce negatives per positive")
    train_cf.set_defaults(handler=cmd_train_cf)

    eval_cf = commands.add_parser(
        "eval-cf",
        help="evaluate a trained CF model (JSON metrics)",
        description="Print RMSE/MAE and top-N metrics on the test part of the split.",
    )
    add_data_flags(eval_cf)
    eval_cf.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/cf)")
    eval_cf.set_defaults(handler=cmd_eval_cf)

    train_towers = commands.add_parser(
        "train-towers",
        help="train the two-tower content model",
        description="Train the user and item towers on the training part of the split, save them "
        "(towers.json + towers_arrays.npz + learning curve) and print test metrics.",
    )
    _add_training_flags(train_towers, "towers", "interactions")
    train_towers.add_argument(
        "--objective",
        choices=["mse", "softmax"],
        help="mse (ratings scaled to [-1, 1]) or softmax (in-batch, log-q corrected)",
    )
    train_towers.add_argument(
        "--preset",
        choices=["rating", "retrieval"],
        help="named settings over the [towers] section (flags still win): rating = the defaults, retrieval = "
        "in-batch softmax, 3 one-cycle epochs, with [retrieval.towers] over it (what make train uses for serving)",
    )
    train_towers.add_argument("--layers", help="hidden layer sizes, e.g. 256,128")
    train_towers.add_argument("--output-dim", type=int, help="embedding size")
    train_towers.add_argument("--temperature", type=float, help="softmax temperature")
    train_towers.set_defaults(handler=cmd_train_towers)

    eval_towers = commands.add_parser(
        "eval-towers",
        help="evaluate a trained two-tower model (JSON metrics)",
        description="Print RMSE/MAE (mse objective) and top-N metrics on the test part of the split.",
    )
    add_data_flags(eval_towers)
    eval_towers.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/towers)")
    eval_towers.set_defaults(handler=cmd_eval_towers)
