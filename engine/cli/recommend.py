"""``tandem recommend / recommend-cf``: query the published bundle, or a trained CF model directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engine.cli.common import engine_config
from engine.config import load_dataset
from engine.errors import ConfigError, TandemError


def cmd_recommend(args: argparse.Namespace, config: dict) -> int:
    from engine.serving.engine import Engine

    eng = Engine.load(args.bundle or config["paths"]["bundles"], engine_config(config))
    if args.example:  # the most active user and the most popular item of the bundle
        from engine.cli.demo import example_ids, example_new_user

        user, item = example_ids(eng.bundle.path)
        args.user, args.similar_to = args.user or user, args.similar_to or item
        _, new_user = example_new_user(eng.bundle.path)
        if "user_features" in new_user:
            args.features = args.features or json.dumps(new_user["user_features"])
        else:
            args.ratings = json.dumps(new_user["ratings"])
    if not (args.user or args.features or args.ratings or args.similar_to):
        raise ConfigError(
            "recommend needs --user ID, --features JSON, --ratings JSON, --similar-to ITEM_ID or --example"
        )
    print(f"bundle {eng.version}")

    def show(heading: str, rec, label: str) -> None:
        print(heading + (f" (served by: {rec.served_by})" if rec.served_by else ""))
        for rank, (item, score, sources) in enumerate(rec, start=1):
            print(f"  {rank:2d}. {eng.title(item):<45} {label} {score:7.3f}  via {', '.join(sources)}")

    if args.user:
        show(f"Recommended for user {args.user}:", eng.recommend(args.user, k=args.k), "score")
    if args.features:
        features = _json_object(args.features, "--features")
        show(f"Recommended for a new user {features}:", eng.recommend(user_features=features, k=args.k), "score")
    if args.ratings:
        ratings = _json_object(args.ratings, "--ratings")
        show(f"Recommended for a new user who rated {ratings}:", eng.recommend(ratings=ratings, k=args.k), "score")
    if args.similar_to:
        show(f"More like {eng.title(args.similar_to)}:", eng.similar_items(args.similar_to, k=args.k), "dist ")
    return 0


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


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
        recs = model.recommend(args.user, k=args.k)
        print(f"Top {len(recs)} for user {args.user} (CF, seen items excluded):")
        rated = [title(i) for i in model.items.external(model.seen(model.users.index(args.user))[:5])]
        print(f"  (rated e.g. {'; '.join(rated)})")
        for rank, (item, score, _) in enumerate(recs, start=1):
            print(f"  {rank:2d}. {title(item):<50} predicted {score:.2f}")
    if args.similar_to is not None:
        if args.bundle:
            from engine.index.bundle import LoadedBundle

            published = LoadedBundle(args.bundle)
            similar = published.similar_items(args.similar_to, k=args.k)
            source = f"FAISS {published.manifest.indexes['cf_l2']['factory']} index of bundle {published.version}"
        else:
            similar = model.similar_items(args.similar_to, k=args.k)
            source = "CF item vectors, brute force"
        print(f"More like {title(args.similar_to)} ({source}, squared distance):")
        for rank, (item, d, _) in enumerate(similar, start=1):
            print(f"  {rank:2d}. {title(item):<50} distance {d:.3f}")
    if args.user is None and args.similar_to is None:
        raise ConfigError("recommend-cf needs --user ID, --similar-to ITEM_ID or --example")
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    recommend = commands.add_parser(
        "recommend",
        help="query the published bundle through the two-stage engine",
        description="Recommendations (with the sources that proposed them) and similar items, with titles.",
    )
    recommend.add_argument("--bundle", metavar="ROOT", help="bundle or bundle root (default: paths.bundles)")
    recommend.add_argument("--user", help="external user id")
    recommend.add_argument("--features", metavar="JSON", help="a new user's features, e.g. '{\"age\": 30}'")
    recommend.add_argument(
        "--ratings", metavar="JSON", help='a new user\'s ratings (CF fold-in), e.g. \'{"50": 5, "181": 4}\''
    )
    recommend.add_argument("--similar-to", metavar="ITEM_ID", help="external item id to find neighbours of")
    recommend.add_argument(
        "--example",
        action="store_true",
        help="the most active user, a new user with features, and the most popular item",
    )
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.set_defaults(handler=cmd_recommend)

    rec = commands.add_parser(
        "recommend-cf",
        help="print CF recommendations and similar items with titles",
        description="Query a trained CF model directly (exact brute force).",
    )
    rec.add_argument("--model", metavar="DIR", help="model directory (default: <paths.models>/cf)")
    rec.add_argument("--data", metavar="PATH", help="dataset for titles (default: data.source)")
    rec.add_argument("--user", help="external user id to recommend for")
    rec.add_argument("--similar-to", metavar="ITEM_ID", help="external item id to find neighbours of")
    rec.add_argument(
        "--bundle",
        metavar="ROOT",
        help="answer --similar-to through a published bundle's "
        "index (a bundle, or a root holding current) instead of brute force",
    )
    rec.add_argument(
        "--example", action="store_true", help="use the most active user and the most rated item as examples"
    )
    rec.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    rec.set_defaults(handler=cmd_recommend_cf)
