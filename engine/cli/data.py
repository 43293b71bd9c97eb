"""``tandem data``: inspect a dataset."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import add_data_file_flags
from engine.config import load_dataset, resolve_data_source
from engine.errors import ConfigError


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
        lines.append(f"  ratings {label}: min {s['min']}, median {s['median']:g}, mean {s['mean']:.1f}, max {s['max']}")
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


def cmd_data_shard(args: argparse.Namespace, config: dict) -> int:
    from engine.data.shards import write_shards

    if args.parts < 1:
        raise ConfigError(f"--parts must be at least 1, got {args.parts}")
    source = args.path or config["data"]["source"]
    dataset = load_dataset(config, source)
    manifest = json.loads(write_shards(dataset, args.out, args.parts).read_text())
    sizes = manifest["part_ratings"]
    print(
        f"wrote {dataset.n_ratings:,} ratings of {dataset.n_users:,} users in {args.parts} parts to {args.out} "
        f"({min(sizes):,} to {max(sizes):,} ratings a part); train on N processes, N dividing {args.parts}: "
        f"torchrun --nproc_per_node N -m engine train-cf --distributed --data {args.out} --split none"
    )
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    data = commands.add_parser("data", help="inspect datasets")
    data.set_defaults(group_parser=data)
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    describe = data_commands.add_parser(
        "describe",
        help="print users, items, ratings, rating scale, sparsity and top items",
        description="PATH is a MovieLens directory (100K, 1M, or the ratings.csv family), "
        "a CSV/Parquet interaction file, or 'synthetic'. Default: data.source.",
    )
    describe.add_argument("path", nargs="?", help="dataset path or 'synthetic'")
    describe.add_argument("--top", type=int, default=10, help="how many top items to list (default 10)")
    add_data_file_flags(describe)
    describe.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    describe.set_defaults(handler=cmd_data_describe)
    shard = data_commands.add_parser(
        "shard",
        help="write a dataset as user-partitioned parts, for training on N processes",
        description="Write PATH's interactions as PARTS Parquet files, user u in part u %% PARTS, with the id maps "
        "and feature tables (engine/data/shards.py). Each rank of `torchrun --nproc_per_node N -m engine train-cf "
        "--distributed --data OUT` (N dividing PARTS) then reads only its own parts.",
    )
    shard.add_argument("path", nargs="?", help="dataset path or 'synthetic' (default: data.source)")
    shard.add_argument("--parts", type=int, required=True, help="how many parts (a multiple of the processes)")
    shard.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not hold shards)")
    add_data_file_flags(shard)
    shard.set_defaults(handler=cmd_data_shard)
