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
    tandem serve [--bundle ROOT] [--port P] [--processes N] [--token-file PATH] ...
    tandem config show

The command line is the application: it drives the library and, for ``build-index``,
``publish``, ``tune``, ``eval-pipeline`` and the serving presets of ``train-cf`` /
``train-towers``, the index builder — the one place in ``engine`` that imports
``index_builder`` (lazily, inside those commands); the library itself never does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from engine import __version__
from engine.cli import data, evaluate, index, recommend, serve, settings, train, tune
from engine.cli.common import engine_config
from engine.config import load_config
from engine.errors import TandemError

# The command groups, one module each, in the order `tandem --help` lists them.
GROUPS = (data, train, tune, index, evaluate, recommend, serve, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem recommendation engine: data, training, indexing and serving.",
        epilog="Settings come from defaults, then tandem.toml, then --set overrides.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: ./tandem.toml when it exists)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set data.synthetic.seed=3 (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
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
        for flag in ("delimiter", "item_features", "user_features"):  # flags of commands that read data files
            if getattr(args, flag, None):
                config["data"][flag] = getattr(args, flag)
        code = handler(args, config)
    except TandemError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "distributed", False):  # a torchrun rank: every rank ends together
        from engine.models.distributed import exit_together

        return exit_together(code)
    return code


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "engine_config", "main"]
