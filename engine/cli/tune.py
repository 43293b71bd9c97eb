"""``tandem tune``: fit the serving settings to your own data (index_builder.tune)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.cli.common import add_data_file_flags, log_to_stderr
from engine.config import load_dataset
from engine.errors import ConfigError


def cmd_tune(args: argparse.Namespace, config: dict) -> int:
    try:
        import optuna  # noqa: F401  (the optimiser tune drives)
    except ImportError:
        raise ConfigError("tandem tune needs optuna: pip install optuna (make install includes it)") from None
    from index_builder.tune import tune, write_settings

    dataset = load_dataset(config, args.data)
    out = Path(args.out or config["paths"]["tuned"])
    log_path = out.with_suffix(".trials.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = tune(
        dataset,
        config,
        budget_minutes=args.budget,
        max_trials=args.trials,
        k=args.k,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        log_path=log_path,
        progress=not args.no_progress,
        log=log_to_stderr,
    )
    write_settings(result, out)
    print(json.dumps({**result, "settings_file": str(out), "trial_log": str(log_path)}, indent=2, default=str))
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    tune = commands.add_parser(
        "tune",
        help="search the serving settings (CF, towers, blend) on a validation split of your data",
        description="Optuna trials, each training CF (pruned early when worse than the median) and then the "
        "whole pipeline, scored by NDCG@k on a validation split carved from the given data only (temporal when "
        "it has timestamps, else per-user random). The best settings go to paths.tuned (artifacts/tuned.toml), "
        "which every later command merges over tandem.toml, so make train / make publish use them; delete the "
        "file to go back to the defaults. Each trial is logged as a JSON line beside it.",
    )
    tune.add_argument("--data", metavar="PATH", help="dataset path or 'synthetic' (default: data.source)")
    add_data_file_flags(tune)
    tune.add_argument("--budget", type=float, default=10.0, metavar="MINUTES", help="time budget (default 10)")
    tune.add_argument("--trials", type=int, help="at most this many trials (default: as many as the budget allows)")
    tune.add_argument("--k", type=int, default=10, help="the NDCG cut-off tuned for (default 10)")
    tune.add_argument(
        "--validation-fraction", type=float, default=0.2, help="each user's share held out for validation (0.2)"
    )
    tune.add_argument("--seed", type=int, default=0, help="seed of the sampler and the split (default 0)")
    tune.add_argument("--out", metavar="PATH", help="settings file to write (default: paths.tuned)")
    tune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tune.set_defaults(handler=cmd_tune)
