"""``tandem eval-pipeline``: protocol B2 on the whole two-stage pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli.common import engine_config
from engine.config import resolve_data_source
from engine.errors import ConfigError


def cmd_eval_pipeline(args: argparse.Namespace, config: dict) -> int:
    from index_builder.evaluate import evaluate_pipeline, format_summary

    source = resolve_data_source(args.data or config["data"]["source"])
    if source == "synthetic" or not Path(source, "u1.base").is_file():
        raise ConfigError(f"eval-pipeline runs protocol B2 on ML-100K folds: {source!r} has no u1.base")
    report = evaluate_pipeline(
        source,
        folds=args.folds,
        k=args.k,
        n_candidates=args.n_candidates,
        engine_config=engine_config(config),
        config=config,
        log=lambda line: print(line, file=sys.stderr),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_summary(report))
    print(f"report: {out}")
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    pipe = commands.add_parser(
        "eval-pipeline",
        help="evaluate the two-stage pipeline on ML-100K folds (protocol B2)",
        description="Train CF (wmse) and towers (softmax) per fold, publish a bundle, and report per-source "
        "candidate recall, final Recall/NDCG@k and latency beside popularity and implicit ALS.",
    )
    pipe.add_argument("--data", metavar="DIR", help="ML-100K directory (default: data.source)")
    pipe.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="folds (default 1..5)")
    pipe.add_argument("--k", type=int, default=10, help="cut-off (default 10)")
    pipe.add_argument("--n-candidates", type=int, default=500, help="candidates per request (default 500)")
    pipe.add_argument("--out", default="artifacts/eval/pipeline.json", help="JSON report path")
    pipe.set_defaults(handler=cmd_eval_pipeline)
