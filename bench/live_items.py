"""Items added live: do copies of popular items rank near their originals?

Issue 18's yardstick for ranking items with no interactions. A bundle is trained as
``make train index`` would (or ``--bundle ROOT`` is used); then copies ("clones") of the
``--n`` most popular items, with the same content (every column of the item feature
table), are added with ``add_items`` and every user's top ``--k`` is computed, with the
learned ranker and with the blend. Reported per ranking: how many users have a clone in
their top 10, and the median rank of clones and of their originals over the (user, item)
pairs where both are in the top ``k``; per clone, the weight its original has among the
bundle items it borrows from (1 when no other item shares its content).

Usage: python bench/live_items.py [--data PATH] [--bundle ROOT] [--n 10] [--k 300]
Writes bench/results/live_items.json.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from _results import save_result

from engine import Engine, EngineConfig
from engine.config import load_config, resolve_data_source
from engine.data import Dataset, load
from index_builder.train import train_and_publish


def raw_item_features(ds: Dataset, item: int) -> dict:
    """An item's features as ``add_items`` takes them: every column of the side table."""
    out: dict = {}
    table = ds.item_features
    for name, column in ({} if table is None else table.columns).items():
        value = column[item]
        if np.ndim(value) == 1:  # multi-valued: 0/1 flags in label order
            out[name] = [float(v) for v in value]
        elif np.asarray(column).dtype.kind == "f":
            if np.isfinite(value):
                out[name] = float(value)
        elif str(value):
            out[name] = str(value)
    return out


def measure(root, ds: Dataset, ranking: str, n: int, k: int) -> dict:
    engine = Engine.load(root, EngineConfig(ranking=ranking))
    popular = np.argsort(-ds.item_counts(), kind="stable")[:n]
    originals = [str(ds.items.ids[i]) for i in popular]
    clones = [f"clone-of-{o}" for o in originals]
    engine.add_items(clones, [raw_item_features(ds, i) for i in popular], persist=False)
    cat = engine._catalogue
    results = engine.recommend_batch(list(ds.users.ids), k=k, exclude_seen=False)
    with_clone = 0
    ranks: dict[str, tuple[list, list]] = {c: ([], []) for c in clones}
    for recs in results:
        at = {item: r for r, item in enumerate(recs.item_ids.tolist())}
        with_clone += any(at.get(c, k) < 10 for c in clones)
        for c, o in zip(clones, originals):
            if c in at and o in at:
                ranks[c][0].append(at[c])
                ranks[c][1].append(at[o])
    per_clone = []
    for j, (c, o, i) in enumerate(zip(clones, originals, popular)):
        mine = cat.borrowed_from[j] == i
        per_clone.append(
            {
                "item": o,
                "title": None if ds.item_titles is None else str(ds.item_titles[i]),
                "original_weight": float(cat.borrowed_weights[j][mine].sum()),
                "pairs": len(ranks[c][0]),
                "median_rank_clone": float(np.median(ranks[c][0])) if ranks[c][0] else None,
                "median_rank_original": float(np.median(ranks[c][1])) if ranks[c][1] else None,
            }
        )
    clone_ranks = [r for c in clones for r in ranks[c][0]]
    original_ranks = [r for c in clones for r in ranks[c][1]]
    return {
        "users": ds.n_users,
        "users_with_a_clone_in_top10": with_clone,
        "pairs": len(clone_ranks),
        "median_rank_clone": float(np.median(clone_ranks)) if clone_ranks else None,
        "median_rank_original": float(np.median(original_ranks)) if original_ranks else None,
        "per_clone": per_clone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="auto", help="the data (default: ML-100K when present, else synthetic)")
    parser.add_argument("--bundle", default=None, help="a bundle root trained on that data (default: train one)")
    parser.add_argument("--n", type=int, default=10, help="clones of the n most popular items")
    parser.add_argument("--k", type=int, default=300, help="the top-k ranks are compared in")
    args = parser.parse_args()
    ds = load(resolve_data_source(args.data))
    with tempfile.TemporaryDirectory() as scratch:
        root = args.bundle
        if root is None:
            print(f"training a bundle on {ds.name} ...", flush=True)
            root = scratch
            train_and_publish(ds, root, load_config(), log=lambda line: None)
        result = {ranking: measure(root, ds, ranking, args.n, args.k) for ranking in ("auto", "blend")}
    out = save_result("live_items", {"data": ds.name, "n": args.n, "k": args.k, **result})
    for ranking, r in result.items():
        print(
            f"\n{'ranker' if ranking == 'auto' else 'blend'}: {r['users_with_a_clone_in_top10']} of {r['users']} users "
            f"have a clone in their top 10; median rank {r['median_rank_clone']} (clones) vs "
            f"{r['median_rank_original']} (originals) over {r['pairs']} pairs in the top {args.k}"
        )
        for c in r["per_clone"]:
            print(
                f"  {(c['title'] or c['item'])[:32]:<33} original's weight {c['original_weight']:.2f}  "
                f"median rank {c['median_rank_clone']} vs {c['median_rank_original']} ({c['pairs']} pairs)"
            )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
