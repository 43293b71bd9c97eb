"""The ``tandem`` command line (also ``python -m engine``).

Global options come before the command: ``--config PATH`` reads a ``tandem.toml``
(default: ``./tandem.toml`` when present) and ``--set section.key=value`` overrides any
setting (repeatable). Commands:

    tandem data describe [PATH] [--top N] [--json]
    tandem train-cf [--data PATH] [--split SPLIT] [--out DIR] [hyperparameters]
    tandem eval-cf [--model DIR] [--data PATH] [--split SPLIT] [--k K]
    tandem recommend [--bundle ROOT] [--user ID] [--features JSON] [--similar-to ITEM_ID] [--example]
    tandem recommend-cf [--user ID] [--similar-to ITEM_ID] [--example] [--k K]
    tandem train-towers [--data PATH] [--split SPLIT] [--objective mse|softmax] [--out DIR] ...
    tandem eval-towers [--model DIR] [--data PATH] [--split SPLIT] [--k K]
    tandem build-index [--data PATH] [--models DIR] [--out ROOT] [--factory F] [--recall-floor R]
    tandem rollback [--root ROOT]
    tandem eval-pipeline [--data DIR] [--folds ...] [--n-candidates N]
    tandem config show
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import numpy as np

from engine import __version__
from pathlib import Path

from engine.config import load_config, load_dataset, load_split, resolve_data_source
from engine.errors import ConfigError, TandemError


def _format_describe(stats: dict) -> str:
    lines = [f"Dataset {stats['name']}"]
    lines.append(f"  users        {stats['n_users']:,}")
    lines.append(f"  items        {stats['n_items']:,}")
    lines.append(f"  ratings      {stats['n_ratings']:,}")
    if stats["n_ratings"]:
        scale = f"{stats['rating_min']:g} to {stats['rating_max']:g}"
        if stats["rating_values"] is not None:
            scale += " (values " + ", ".join(f"{v:g}" for v in stats["rating_values"]) + ")"
        if stats["implicit"]:
            scale += " — implicit feedback"
        lines.append(f"  rating scale {scale}, mean {stats['rating_mean']:.3f}")
    lines.append(f"  sparsity     {100 * stats['sparsity']:.2f}% of user-item pairs unrated")
    for label, key in (("per user", "ratings_per_user"), ("per item", "ratings_per_item")):
        s = stats[key]
        lines.append(f"  ratings {label}: min {s['min']}, median {s['median']:g}, "
                     f"mean {s['mean']:.1f}, max {s['max']}")
    if stats["user_feature_columns"]:
        lines.append("  user features: " + ", ".join(stats["user_feature_columns"]))
    if stats["item_feature_columns"]:
        lines.append("  item features: " + ", ".join(stats["item_feature_columns"]))
    if stats["top_items"]:
        lines.append(f"Top {len(stats['top_items'])} items by number of ratings:")
        width = max(len(t["title"]) for t in stats["top_items"])
        for rank, t in enumerate(stats["top_items"], start=1):
            mean = f", mean {t['mean_rating']:.2f}" if not stats["implicit"] else ""
            lines.append(f"  {rank:3d}. {t['title']:<{width}}  {t['n_ratings']:,} ratings{mean}")
    return "\n".join(lines)


def cmd_data_describe(args: argparse.Namespace, config: dict) -> int:
    source = args.path or config["data"]["source"]
    dataset = load_dataset(config, source)
    stats = dataset.describe(top=args.top)
    stats["source"] = resolve_data_source(source)
    print(json.dumps(stats, indent=2) if args.json else _format_describe(stats))
    return 0


# Flags that set a model setting of the same name. Unset flags fall back on
# tandem.toml's [cf] / [towers] sections, then the defaults.
CF_FLAGS = ("n_features", "lambda_", "learning_rate", "epochs", "batch_size", "loss", "device", "seed",
            "negative_sampling", "negative_ratio")


def _model_config(config_class, section: str, config: dict, args: argparse.Namespace, flags,
                  extra: dict | None = None):
    """A model config from the file's section, overridden by the command's flags."""
    settings = {**config[section], **(extra or {})}
    settings.update({key: getattr(args, key) for key in flags if getattr(args, key) is not None})
    if args.no_progress:
        settings["progress"] = False
    try:
        return config_class.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from None


def _train_and_test(args: argparse.Namespace, config: dict):
    """The (train, test-or-None) pair the data/split flags and configuration name."""
    split = load_split(config, args.data, args.split)
    if split is None:
        return load_dataset(config, args.data), None
    return split.train, split.test


def _cf_report(model, test, k: int) -> dict:
    from engine.evaluation.offline import check_aligned, rating_metrics, topn_metrics

    check_aligned(model.users, model.items, test)
    report = {"model": "cf", "loss": model.config.loss, "test": test.name, "n_test_ratings": test.n_ratings}
    if model.config.loss == "mse":
        report.update(rating_metrics(model.predict_indices, test, clip=model.rating_range))
    report.update(topn_metrics(lambda users, kk: model.recommend_indices(users, kk), test, k=k))
    return report


def cmd_train_cf(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import PRESETS, CFConfig, train_cf

    cf_config = _model_config(CFConfig, "cf", config, args, CF_FLAGS, PRESETS[args.preset] if args.preset else None)
    return _fit_report_save(args, config, "cf", "CF", train_cf, cf_config,
                            lambda model, train, test: _cf_report(model, test, args.k))


def _fit_report_save(args: argparse.Namespace, config: dict, subdir: str, label: str, fit, model_config,
                     report) -> int:
    """Train on the split's train part, evaluate on its test part (if any), save the model
    (default <paths.models>/<subdir>) with its learning curve, and print the metrics."""
    train, test = _train_and_test(args, config)
    out = Path(args.out or Path(config["paths"]["models"]) / subdir)
    print(f"training {label} on {train.name}: {train.n_users:,} users, {train.n_items:,} items, "
          f"{train.n_ratings:,} ratings", file=sys.stderr)
    model = fit(train, model_config, curve_path=out / "learning_curve.json")
    if test is not None:
        model.metrics["test"] = report(model, train, test)
    model.save(out)
    print(json.dumps({"saved": str(out), **model.metrics}, indent=2))
    return 0


def cmd_eval_cf(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import CFModel

    model = CFModel.load(args.model or Path(config["paths"]["models"]) / "cf")
    _, test = _train_and_test(args, config)
    if test is None:
        raise ConfigError("eval-cf needs a test split: --split none leaves nothing to evaluate")
    print(json.dumps(_cf_report(model, test, args.k), indent=2))
    return 0


TOWER_FLAGS = ("objective", "learning_rate", "epochs", "batch_size", "output_dim", "temperature",
               "device", "seed")


def _towers_report(model, train, test, k: int) -> dict:
    from engine.evaluation.offline import check_aligned, rating_metrics, topn_metrics

    check_aligned(model.users, model.items, test)
    report = {"model": "two_tower", "objective": model.config.objective, "test": test.name,
              "n_test_ratings": test.n_ratings}
    if model.config.objective == "mse":
        report.update(rating_metrics(model.predict_rating_indices, test))
    seen = train.user_items()
    report.update(topn_metrics(lambda users, kk: model.recommend_indices(users, kk, seen), test, k=k))
    return report


def cmd_train_towers(args: argparse.Namespace, config: dict) -> int:
    from engine.models.towers import TowerConfig, train_two_tower

    extra = {}
    if args.layers is not None:
        extra["hidden_layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
    tower_config = _model_config(TowerConfig, "towers", config, args, TOWER_FLAGS, extra)
    return _fit_report_save(args, config, "towers", f"two towers ({tower_config.objective})", train_two_tower,
                            tower_config, lambda model, train, test: _towers_report(model, train, test, args.k))


def cmd_eval_towers(args: argparse.Namespace, config: dict) -> int:
    from engine.models.towers import TwoTowerModel

    model = TwoTowerModel.load(args.model or Path(config["paths"]["models"]) / "towers")
    train, test = _train_and_test(args, config)
    if test is None:
        raise ConfigError("eval-towers needs a test split: --split none leaves nothing to evaluate")
    print(json.dumps(_towers_report(model, train, test, args.k), indent=2))
    return 0


def cmd_build_index(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import CFModel
    from engine.models.towers import TwoTowerModel
    from index_builder.build import build_bundle

    models = Path(args.models or config["paths"]["models"])
    for sub, name in (("cf", "cf.json"), ("towers", "towers.json")):
        if not (models / sub / name).is_file():
            raise ConfigError(f"{models / sub}: no trained model; run `make train` (or tandem train-cf / "
                              f"train-towers --split none) first")
    cf, towers = CFModel.load(models / "cf"), TwoTowerModel.load(models / "towers")
    dataset = load_dataset(config, args.data)
    index_cfg = config["index"]
    root = Path(args.out or config["paths"]["bundles"])
    print(f"building indexes for {dataset.name} ({dataset.n_items:,} items) into {root}", file=sys.stderr)
    published = build_bundle(
        dataset, cf, towers, root,
        factory=args.factory or index_cfg["factory"] or None,
        recall_floor=args.recall_floor if args.recall_floor is not None else index_cfg["recall_floor"],
        k=index_cfg["recall_k"], keep=args.keep if args.keep is not None else index_cfg["keep"],
        exact_below=index_cfg["exact_below"], user_top_k=index_cfg["user_top_k"],
        log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"published": str(published), "version": published.name}, indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace, config: dict) -> int:
    from engine.index import bundle

    root = Path(args.root or config["paths"]["bundles"])
    before = bundle.current_version(root)
    after = bundle.rollback(root)
    print(f"rolled back {root}/current: {before} -> {after}")
    return 0


def cmd_serve(args: argparse.Namespace, config: dict) -> int:
    import os

    from engine.service.server import ServerConfig, TandemServer, configure_logging

    cfg = dict(config["server"])
    for key in ("host", "port", "processes", "workers", "metrics_port", "tls_cert", "tls_key", "token_all"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    processes = int(cfg.pop("processes"))
    if processes < 1:
        raise ConfigError(f"server.processes must be at least 1, got {processes}")
    root = Path(args.bundle or config["paths"]["bundles"])
    if processes > 1:
        return _serve_processes(args, cfg, processes, root)
    cfg["token"] = _token(args)
    cfg["reuse_port"] = bool(args.reuse_port)
    cfg["metrics_port"] = None if cfg["metrics_port"] is None or int(cfg["metrics_port"]) < 0 else int(cfg["metrics_port"])
    cfg["tls_cert"], cfg["tls_key"] = cfg["tls_cert"] or None, cfg["tls_key"] or None
    try:
        server_config = ServerConfig(**cfg)
    except TypeError as e:
        raise ConfigError(f"[server]: {e}") from None
    configure_logging(args.log_level)
    server = TandemServer(root, server_config, engine_config(config)).start()
    if args.port_file:
        Path(args.port_file).write_text(f"{server.port}\n")
    print(f"serving {server.holder.engine.version} on {server_config.host}:{server.port}"
          + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), file=sys.stderr, flush=True)
    server.serve_until_signal()
    return 0


def _serve_processes(args: argparse.Namespace, cfg: dict, processes: int, root: Path) -> int:
    """``tandem serve --processes N``: N single-process servers on one port (see
    :mod:`engine.service.processes`), each started with this command's settings."""
    import os

    from engine.service.processes import serve_processes
    from engine.service.server import SHUTDOWN_MARGIN

    command = [sys.executable, "-m", "engine.cli"]
    command += ["--config", args.config] if args.config else []
    for override in args.overrides:
        command += ["--set", override]
    command += ["serve", "--processes", "1", "--bundle", str(root), "--host", str(cfg["host"]),
                "--workers", str(cfg["workers"]), "--log-level", args.log_level]
    command += ["--tls-cert", cfg["tls_cert"], "--tls-key", cfg["tls_key"]] if cfg["tls_cert"] else []
    command += ["--token-all"] if cfg["token_all"] else []
    token = _token(args)
    if token:  # passed on in the environment, not on a command line others can read
        os.environ["TANDEM_TOKEN"] = token
    command += ["--reuse-port"]  # the group's processes, and only they, share the port
    metrics_port = cfg["metrics_port"]
    metrics_port = None if metrics_port is None or int(metrics_port) < 0 else int(metrics_port)
    # Each process has server.grace seconds for its in-flight requests, and its own
    # watchdog a little beyond; the supervisor kills only what outlives both.
    return serve_processes(processes, command, str(cfg["host"]), int(cfg["port"]), metrics_port, args.port_file,
                           stop_timeout=float(cfg["grace"]) + 2 * SHUTDOWN_MARGIN)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, --token or $TANDEM_TOKEN (in that order), or
    None. A token that is set but empty is refused: it would silently turn auth off."""
    import os

    if args.token_file:
        try:
            token, origin = Path(args.token_file).read_text(encoding="utf-8").strip(), args.token_file
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: {e.strerror}") from None
    elif args.token is not None:
        token, origin = args.token, "--token"
    elif "TANDEM_TOKEN" in os.environ:
        token, origin = os.environ["TANDEM_TOKEN"], "TANDEM_TOKEN"
    else:
        return None
    if not token.strip():
        raise ConfigError(f"{origin} is set but empty: refusing to serve without authentication by accident "
                          "(unset it to serve without a token)")
    return token


def engine_config(config: dict):
    """The :class:`~engine.EngineConfig` of the ``[engine]`` section."""
    from engine.serving.engine import EngineConfig

    try:
        return EngineConfig(**config["engine"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[engine]: {e}") from None


def cmd_eval_pipeline(args: argparse.Namespace, config: dict) -> int:
    from engine.evaluation.pipeline import evaluate_pipeline, format_summary

    source = resolve_data_source(args.data or config["data"]["source"])
    if source == "synthetic" or not Path(source, "u1.base").is_file():
        raise ConfigError(f"eval-pipeline runs protocol B2 on ML-100K folds: {source!r} has no u1.base")
    report = evaluate_pipeline(source, folds=args.folds, k=args.k, n_candidates=args.n_candidates,
                               engine_config=engine_config(config), log=lambda line: print(line, file=sys.stderr))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_summary(report))
    print(f"report: {out}")
    return 0


def cmd_recommend(args: argparse.Namespace, config: dict) -> int:
    from engine.serving.engine import Engine

    eng = Engine.load(args.bundle or config["paths"]["bundles"], engine_config(config))
    if args.example:  # the most active user and the most popular item of the bundle
        from engine.cli.demo import example_ids

        user, item = example_ids(eng.bundle.path)
        args.user, args.similar_to = args.user or user, args.similar_to or item
        args.features = args.features or json.dumps({"age": 25, "gender": "F", "occupation": "student",
                                                     "zip_code": "94043"})
    if not (args.user or args.features or args.similar_to):
        raise ConfigError("recommend needs --user ID, --features JSON, --similar-to ITEM_ID or --example")
    print(f"bundle {eng.version}")

    def show(heading: str, rec, label: str) -> None:
        print(heading)
        for rank, (item, score, sources) in enumerate(rec, start=1):
            print(f"  {rank:2d}. {eng.title(item):<45} {label} {score:7.3f}  via {', '.join(sources)}")

    if args.user:
        show(f"Recommended for user {args.user}:", eng.recommend(args.user, k=args.k), "score")
    if args.features:
        try:
            features = json.loads(args.features)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--features must be a JSON object: {e}") from None
        show(f"Recommended for a new user {features}:", eng.recommend(user_features=features, k=args.k), "score")
    if args.similar_to:
        show(f"More like {eng.title(args.similar_to)}:", eng.similar_items(args.similar_to, k=args.k), "dist ")
    return 0


def _titles_for(config: dict, source: str | None):
    """A function item id -> readable title, from the configured dataset when it has titles."""
    try:
        dataset = load_dataset(config, source)
    except TandemError:
        return str
    if dataset.item_titles is None:
        return str
    return lambda item_id: dataset.title(dataset.items.index(item_id)) if item_id in dataset.items else str(item_id)


def cmd_recommend_cf(args: argparse.Namespace, config: dict) -> int:
    from engine.models.cf import CFModel

    model = CFModel.load(args.model or Path(config["paths"]["models"]) / "cf")
    title = _titles_for(config, args.data)
    if args.example:  # the most active user and the most rated item of the training data
        counts = np.diff(model.seen_indptr)
        args.user = args.user or str(model.users.ids[int(np.argmax(counts))])
        popularity = np.bincount(model.seen_indices, minlength=len(model.items))
        args.similar_to = args.similar_to or str(model.items.ids[int(np.argmax(popularity))])
    if args.user is not None:
        ids, scores = model.recommend(args.user, k=args.k)
        print(f"Top {len(ids)} for user {args.user} (CF, seen items excluded):")
        rated = [title(i) for i in model.items.external(model.seen(model.users.index(args.user))[:5])]
        print(f"  (rated e.g. {'; '.join(rated)})")
        for rank, (item, score) in enumerate(zip(ids, scores), start=1):
            print(f"  {rank:2d}. {title(item):<50} predicted {score:.2f}")
    if args.similar_to is not None:
        if args.bundle:
            from engine.index.bundle import LoadedBundle

            published = LoadedBundle(args.bundle)
            ids, dist = published.similar_items(args.similar_to, k=args.k)
            source = f"FAISS {published.manifest['indexes']['cf_l2']['factory']} index of bundle {published.version}"
        else:
            ids, dist = model.similar_items(args.similar_to, k=args.k)
            source = "CF item vectors, brute force"
        print(f"More like {title(args.similar_to)} ({source}, squared distance):")
        for rank, (item, d) in enumerate(zip(ids, dist), start=1):
            print(f"  {rank:2d}. {title(item):<50} distance {d:.3f}")
    if args.user is None and args.similar_to is None:
        raise ConfigError("recommend-cf needs --user ID, --similar-to ITEM_ID or --example")
    return 0


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="dataset path or 'synthetic' (default: data.source)")
    p.add_argument("--split", help="auto, u1..u5, ua, ub, random, last, cold-items or none "
                                   "(default: data.split)")
    p.add_argument("--k", type=int, default=10, help="cut-off of the top-N metrics (default 10)")


def _add_training_flags(p: argparse.ArgumentParser, subdir: str, unit: str) -> None:
    """Data flags plus the options every trainer has."""
    _add_data_flags(p)
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: <paths.models>/{subdir})")
    p.add_argument("--lr", dest="learning_rate", type=float, help="Adam learning rate")
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, help=f"{unit} per minibatch")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_config_show(args: argparse.Namespace, config: dict) -> int:
    print(json.dumps(config, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem recommendation engine: data, training, indexing and serving.",
        epilog="Settings come from defaults, then tandem.toml, then --set overrides.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file "
                        "(default: ./tandem.toml when it exists)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set data.synthetic.seed=3 (repeatable)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = commands.add_parser("data", help="inspect datasets")
    data.set_defaults(group_parser=data)
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    describe = data_commands.add_parser(
        "describe", help="print users, items, ratings, rating scale, sparsity and top items",
        description="PATH is a MovieLens directory (100K, 1M, or the ratings.csv family), "
                    "a CSV/Parquet interaction file, or 'synthetic'. Default: data.source.")
    describe.add_argument("path", nargs="?", help="dataset path or 'synthetic'")
    describe.add_argument("--top", type=int, default=10, help="how many top items to list (default 10)")
    describe.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    describe.set_defaults(handler=cmd_data_describe)

    train_cf = commands.add_parser(
        "train-cf", help="train the collaborative-filtering model",
        description="Train matrix factorisation on the training part of the split, save it "
                    "(cf.json + cf_arrays.npz + learning curve) and print test metrics.")
    _add_training_flags(train_cf, "cf", "ratings")
    train_cf.add_argument("--n-features", type=int, help="latent dimension")
    train_cf.add_argument("--lambda", dest="lambda_", type=float, help="L2 strength")
    train_cf.add_argument("--preset", choices=["rating", "topn"],
                          help="named settings over the [cf] section (flags still win): rating = B1 defaults, "
                               "topn = wmse for top-N retrieval (what make train uses for serving)")
    train_cf.add_argument("--loss", choices=["mse", "bce", "wmse"],
                          help="mse (ratings), bce (binary, sampled negatives) or wmse (implicit, all pairs weighted)")
    train_cf.add_argument("--negative-sampling", choices=["uniform", "popularity"], help="bce negatives")
    train_cf.add_argument("--negative-ratio", type=int, help="bce negatives per positive")
    train_cf.set_defaults(handler=cmd_train_cf)

    eval_cf = commands.add_parser("eval-cf", help="evaluate a trained CF model (JSON metrics)",
                                  description="Print RMSE/MAE and top-N metrics on the test part of the split.")
    _add_data_flags(eval_cf)
    eval_cf.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/cf)")
    eval_cf.set_defaults(handler=cmd_eval_cf)

    train_towers = commands.add_parser(
        "train-towers", help="train the two-tower content model",
        description="Train the user and item towers on the training part of the split, save them "
                    "(towers.json + towers_arrays.npz + learning curve) and print test metrics.")
    _add_training_flags(train_towers, "towers", "interactions")
    train_towers.add_argument("--objective", choices=["mse", "softmax"],
                              help="mse (ratings scaled to [-1, 1]) or softmax (in-batch, log-q corrected)")
    train_towers.add_argument("--layers", help="hidden layer sizes, e.g. 256,128")
    train_towers.add_argument("--output-dim", type=int, help="embedding size")
    train_towers.add_argument("--temperature", type=float, help="softmax temperature")
    train_towers.set_defaults(handler=cmd_train_towers)

    eval_towers = commands.add_parser("eval-towers", help="evaluate a trained two-tower model (JSON metrics)",
                                      description="Print RMSE/MAE (mse objective) and top-N metrics on the "
                                                  "test part of the split.")
    _add_data_flags(eval_towers)
    eval_towers.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/towers)")
    eval_towers.set_defaults(handler=cmd_eval_towers)

    build = commands.add_parser(
        "build-index", help="build the FAISS indexes from the trained models and publish a bundle",
        description="Export item vectors from the latest trained models (<paths.models>/cf and /towers, "
                    "no retraining), build and recall-check the indexes, and publish a new bundle version "
                    "atomically as <paths.bundles>/current.")
    build.add_argument("--data", metavar="PATH", help="the dataset the models were trained on (default: data.source)")
    build.add_argument("--models", metavar="DIR", help="trained models directory (default: paths.models)")
    build.add_argument("--out", metavar="ROOT", help="bundle root (default: paths.bundles)")
    build.add_argument("--factory", help="FAISS factory string for every index (default: by catalogue size)")
    build.add_argument("--recall-floor", type=float, help="refuse to publish below this recall@k (default 0.95)")
    build.add_argument("--keep", type=int, help="versions to keep (default 5)")
    build.set_defaults(handler=cmd_build_index)

    rollback = commands.add_parser("rollback", help="point the bundle root's current at the previous version")
    rollback.add_argument("--root", help="bundle root (default: paths.bundles)")
    rollback.set_defaults(handler=cmd_rollback)

    pipe = commands.add_parser(
        "eval-pipeline", help="evaluate the two-stage pipeline on ML-100K folds (protocol B2)",
        description="Train CF (wmse) and towers (softmax) per fold, publish a bundle, and report per-source "
                    "candidate recall, final Recall/NDCG@k and latency beside popularity and implicit ALS.")
    pipe.add_argument("--data", metavar="DIR", help="ML-100K directory (default: data.source)")
    pipe.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="folds (default 1..5)")
    pipe.add_argument("--k", type=int, default=10, help="cut-off (default 10)")
    pipe.add_argument("--n-candidates", type=int, default=500, help="candidates per request (default 500)")
    pipe.add_argument("--out", default="artifacts/eval/pipeline.json", help="JSON report path")
    pipe.set_defaults(handler=cmd_eval_pipeline)

    recommend = commands.add_parser(
        "recommend", help="query the published bundle through the two-stage engine",
        description="Recommendations (with the sources that proposed them) and similar items, with titles.")
    recommend.add_argument("--bundle", metavar="ROOT", help="bundle or bundle root (default: paths.bundles)")
    recommend.add_argument("--user", help="external user id")
    recommend.add_argument("--features", metavar="JSON", help='a new user\'s features, e.g. \'{"age": 30}\'')
    recommend.add_argument("--similar-to", metavar="ITEM_ID", help="external item id to find neighbours of")
    recommend.add_argument("--example", action="store_true",
                           help="the most active user, a new user with features, and the most popular item")
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.set_defaults(handler=cmd_recommend)

    rec = commands.add_parser("recommend-cf", help="print CF recommendations and similar items with titles",
                              description="Query a trained CF model directly (exact brute force).")
    rec.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/cf)")
    rec.add_argument("--data", metavar="PATH", help="dataset for titles (default: data.source)")
    rec.add_argument("--user", help="external user id to recommend for")
    rec.add_argument("--similar-to", metavar="ITEM_ID", help="external item id to find neighbours of")
    rec.add_argument("--bundle", metavar="ROOT", help="answer --similar-to through a published bundle's "
                     "index (a bundle, or a root holding current) instead of brute force")
    rec.add_argument("--example", action="store_true",
                     help="use the most active user and the most rated item as examples")
    rec.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    rec.set_defaults(handler=cmd_recommend_cf)

    serve = commands.add_parser(
        "serve", help="serve the published bundle over gRPC (hot reload, health, reflection, metrics)",
        description="Serve <paths.bundles> over gRPC until SIGTERM/SIGINT. The bearer token comes from "
                    "--token-file, --token or the TANDEM_TOKEN environment variable; when set it is required on "
                    "the Admin service and on AddItems (and on every rpc with --token-all). An empty token is "
                    "refused. Prefer --token-file or TANDEM_TOKEN: a --token is visible to every local user in "
                    "the process list.")
    serve.add_argument("--bundle", metavar="ROOT", help="bundle root holding current (default: paths.bundles)")
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port; 0 = any free port)")
    serve.add_argument("--token", help="bearer token (default: $TANDEM_TOKEN; none = no authentication); "
                       "visible to other local users in the process list: prefer --token-file")
    serve.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file (one line)")
    serve.add_argument("--token-all", action="store_true", default=None, help="require the token on every rpc")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (TLS with --tls-key)")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 = off, 0 = any free port)")
    serve.add_argument("--processes", type=int, help="server processes sharing the port through SO_REUSEPORT, "
                       "about one per core (default: server.processes)")
    serve.add_argument("--workers", type=int, help="request threads per process (default: server.workers)")
    serve.add_argument("--port-file", metavar="PATH", help="write the bound port there once serving (for scripts)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by --processes for its group
    serve.add_argument("--log-level", default="INFO", help="INFO (default) or DEBUG (a JSON line per request)")
    serve.set_defaults(handler=cmd_serve)

    config_parser = commands.add_parser("config", help="show the effective configuration")
    config_parser.set_defaults(group_parser=config_parser)
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print the configuration after file and overrides")
    show.set_defaults(handler=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable | None = getattr(args, "handler", None)
    if handler is None:
        # No command, or a group without its subcommand: show the relevant help.
        getattr(args, "group_parser", parser).print_help(sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        return handler(args, config)
    except TandemError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
