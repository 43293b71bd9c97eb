"""What several command groups share: the data and split flags, and the engine settings."""

from __future__ import annotations

import argparse
import sys

from engine.errors import ConfigError


def add_data_file_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that reads data files: the CSV separator and the side tables."""
    p.add_argument("--delimiter", help="field separator of a CSV data file (default: data.delimiter, ',')")
    p.add_argument(
        "--item-features",
        metavar="PATH",
        help="a CSV/Parquet side table of item attributes keyed by item id (default: data.item_features)",
    )
    p.add_argument(
        "--user-features",
        metavar="PATH",
        help="a CSV/Parquet side table of user attributes keyed by user id (default: data.user_features)",
    )


def join_ranks(device: str | None) -> int:
    """``--distributed``: join the process group torchrun started this process in
    (:mod:`engine.models.distributed`); returns this process's rank, which rank 0 says."""
    from engine.models.distributed import init_from_environment

    rank, size = init_from_environment(device)
    if rank == 0:
        print(f"rank 0 of {size}: training on {size} processes", file=sys.stderr)
    return rank


def say_parts_read(dataset, source) -> None:
    """A rank that read only its parts of a sharded directory says how much of it."""
    if dataset.shard_of is not None:
        from engine.models.distributed import world

        rank, size = world()
        print(f"rank {rank} of {size}: read {dataset.n_ratings:,} of the {dataset.shard_of['n_ratings']:,} "
              f"ratings in {source} (its parts)", file=sys.stderr)  # fmt: skip


def log_to_stderr(line: str) -> None:
    """Progress lines of the library's long jobs go to stderr; stdout carries results."""
    print(line, file=sys.stderr)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="dataset path or 'synthetic' (default: data.source)")
    add_data_file_flags(p)
    p.add_argument(
        "--split", help="auto, u1..u5, ua, ub, random, temporal, last, cold-items or none (default: data.split)"
    )
    add_metric_flags(p)


def add_metric_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the top-N metrics: the cut-off and the relevance threshold."""
    p.add_argument("--k", type=int, default=10, help="cut-off of the top-N metrics (default 10)")
    p.add_argument(
        "--min-rating",
        type=float,
        help="a test interaction is relevant when rated at least this (default: the data's rule: "
        "every interaction of implicit data, else 4)",
    )


def engine_config(config: dict):
    """The :class:`~engine.EngineConfig` of the ``[engine]`` section."""
    from engine.settings import EngineConfig

    try:
        return EngineConfig(**config["engine"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[engine]: {e}") from None
