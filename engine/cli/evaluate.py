"""``tandem eval-pipeline``: the two-stage pipeline on any data and split, beside the peers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.cli.common import add_data_file_flags, add_metric_flags, engine_config, log_to_stderr
from engine.config import load_dataset, resolve_data_source, split_with_configured_side_tables


def cmd_eval_pipeline(args: argparse.Namespace, config: dict) -> int:
    from index_builder.evaluate import PEERS, evaluate_pipeline, format_summary, make_splits, plot_summary

    source = resolve_data_source(args.data or config["data"]["source"])
    directory = None if source == "synthetic" else Path(source)
    ml100k_folds = directory is not None and Path(directory, "u1.base").is_file()
    # The predefined ML-100K folds read their own files; every other split needs the data.
    needs_dataset = not (ml100k_folds and (args.split == "folds" or args.split.startswith("u")))
    dataset = load_dataset(config, source) if needs_dataset else None
    splits = make_splits(dataset, directory, args.split, args.test_fraction, args.last_n, args.seed)
    if dataset is None:  # ML-100K's own fold files: the configured side tables join each part
        splits = [(name, split_with_configured_side_tables(config, split)) for name, split in splits]
    peer_names = PEERS if args.peers is None else tuple(args.peers)
    report = evaluate_pipeline(
        splits,
        k=args.k,
        n_candidates=args.n_candidates,
        min_rating="auto" if args.min_rating is None else args.min_rating,
        engine_config=engine_config(config),
        config=config,
        peer_names=peer_names,
        ease_max_items=args.ease_max_items,
        data_name=source if dataset is None else dataset.name,
        log=log_to_stderr,
        ablation=not args.no_ablation,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_summary(report))
    print(f"report: {out}")
    chart = plot_summary(report, out.with_suffix(".png"))
    print(f"chart: {chart}" if chart else "chart: not drawn (matplotlib is not installed)")
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    from engine.evaluation.peers import EASE_MAX_ITEMS
    from index_builder.evaluate import PEERS, SPLITS

    pipe = commands.add_parser(
        "eval-pipeline",
        help="evaluate the two-stage pipeline on any data and split, beside popularity, implicit ALS and EASE",
        description="Per split: train CF and towers on the training part and publish a bundle (as make train index "
        "does), then report final Recall/NDCG@k, per-source candidate recall, latency and fit seconds beside the "
        "peers fitted on the same training part (implicit ALS and EASE: best of a small grid), and an ablation of "
        "the learned ranker (the blend alone; the ranker without each feature group). Writes a JSON "
        "report and a PNG chart beside it.",
    )
    pipe.add_argument("--data", metavar="PATH", help="dataset path or 'synthetic' (default: data.source)")
    add_data_file_flags(pipe)
    pipe.add_argument(
        "--split",
        choices=SPLITS,
        default="folds",
        help="folds (ML-100K u1..u5, else five seeded per-user random splits), u1..u5, temporal (each user's "
        "latest --test-fraction), random (a seeded per-user fraction) or last (each user's latest --last-n); "
        "default folds",
    )
    pipe.add_argument("--test-fraction", type=float, default=0.2, help="temporal/random: test share (default 0.2)")
    pipe.add_argument("--last-n", type=int, default=1, help="last: interactions held out per user (default 1)")
    pipe.add_argument("--seed", type=int, default=0, help="random/folds: seed of the split (default 0)")
    add_metric_flags(pipe)
    pipe.add_argument("--n-candidates", type=int, default=500, help="candidates per request (default 500)")
    pipe.add_argument("--peers", nargs="*", choices=PEERS, help=f"peers to run (default: all of {', '.join(PEERS)})")
    pipe.add_argument(
        "--ease-max-items",
        type=int,
        default=EASE_MAX_ITEMS,
        help=f"skip EASE when items and users both exceed this (a dense inverse; default {EASE_MAX_ITEMS:,})",
    )
    pipe.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the ablation (the blend alone, and the ranker without each feature group)",
    )
    pipe.add_argument("--out", default="artifacts/eval/pipeline.json", help="JSON report path (the PNG goes beside it)")
    pipe.set_defaults(handler=cmd_eval_pipeline)
