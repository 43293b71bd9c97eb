"""Benchmark of the Milvus backend (Milvus Lite, embedded) beside FAISS, in one run.

1. **Search**: on the same 100k x 64 vectors (inner product), FAISS Flat, FAISS HNSW32
   and Milvus Lite FLAT: recall@10 against exact search, single-query QPS and batched
   QPS (100 queries per call).
2. **Filters on Milvus**: a user's seen items (100 ids excluded), and a genre filter
   allowing 30% of the items with the seen items excluded: as item ids in the
   expression, applied to an over-fetched result, or (the genre) as the collection's
   attribute field in the expression: milliseconds per query (what the backend chooses).
3. **Engine**: ``recommend`` latency on a bundle built on each backend (a smaller
   catalogue: Milvus Lite inserts and searches slowly), for known users (the per-user
   tables: no search) and fold-in users (searches).

Milvus Lite 3.x is a pure-Python re-implementation of Milvus's API: its latency says what
the code path costs, not what a Milvus server would (see docs/scaling.md).

Usage: python bench/milvus.py [--n 100000] [--engine-items 10000]
Writes bench/results/milvus.json and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _catalogue import build_catalogue_bundle
from _results import save_result

from engine import Engine
from engine.data.attributes import LABELS, Attribute, ItemAttributes
from engine.index import faiss_index, milvus_index
from engine.index.exact import ExactIndex
from engine.index.vector_index import Conditions, pack_mask


def timed(search, queries: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Queries per second of ``search(queries[i:i+batch])``, and the labels."""
    labels = []
    start = time.perf_counter()
    for at in range(0, len(queries), batch):
        labels.append(search(queries[at : at + batch]))
    return len(queries) / (time.perf_counter() - start), np.vstack(labels)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def search_table(vectors: np.ndarray, queries: np.ndarray, target, single: int, attributes: ItemAttributes) -> dict:
    exact = ExactIndex(vectors, "ip")
    want = exact.search(queries, 10)[1]
    out = {}
    backends = {
        "faiss Flat": lambda: faiss_index.build_index(vectors, "ip", "Flat", k=10, n_queries=200)[0],
        "faiss HNSW32": lambda: faiss_index.build_index(vectors, "ip", "HNSW32", k=10, n_queries=200)[0],
        "milvus-lite FLAT": lambda: milvus_index.build_index(
            vectors, "ip", "Flat", target, "bench", k=10, n_queries=50
        )[0],
    }
    for name, build in backends.items():
        start = time.perf_counter()
        index = build()
        built = time.perf_counter() - start
        n_single = single if name.startswith("milvus") else len(queries)
        qps1, _ = timed(lambda q: index.search(q, 10)[1], queries[:n_single], 1)
        qps100, labels = timed(lambda q: index.search(q, 10)[1], queries, 100)
        out[name] = {
            "build_s": built,
            "recall_at_10": recall(labels, want),
            "qps_single": qps1,
            "qps_batch_100": qps100,
        }
        print(
            f"  {name:<17} build {built:6.1f} s  recall@10 {out[name]['recall_at_10']:.4f}  "
            f"single {qps1:8.1f} q/s  batched {qps100:8.1f} q/s",
            flush=True,
        )
        if name.startswith("milvus"):
            out["_milvus_index"] = index
    return out


def filter_table(index, attributes: ItemAttributes, n: int, queries: np.ndarray) -> dict:
    """Milliseconds per query of each way to apply a filter: the item ids in the
    expression, the ids dropped from an over-fetched result, or (for an attribute
    filter) the collection's attribute field in the expression."""
    rng = np.random.default_rng(1)
    seen = np.ones(n, bool)
    seen[rng.choice(n, 100, replace=False)] = False
    genre = {"genres": ["g0"]}  # about 30% of the items
    genre_mask = attributes.mask(genre, n)
    cases = [
        ("exclude 100 seen items", seen, None),
        ("genre (30%), seen excluded", genre_mask & seen, Conditions(genre, genre_mask)),
    ]
    out = {}
    for label, mask, conditions in cases:
        strategies = [("id expression", 10**9, None), ("over-fetch", 0, None)]
        if conditions is not None:
            strategies.append(("attribute field", milvus_index.MAX_EXPRESSION_IDS, conditions))
        for strategy, limit, given in strategies:
            saved = milvus_index.MAX_EXPRESSION_IDS
            milvus_index.MAX_EXPRESSION_IDS = limit
            try:
                bits = pack_mask(mask)
                start = time.perf_counter()
                for q in queries:
                    index.search(q[None, :], 10, bits, given)
                ms = (time.perf_counter() - start) / len(queries) * 1e3
            finally:
                milvus_index.MAX_EXPRESSION_IDS = saved
            out[f"{label}, {strategy}"] = ms
            print(f"  {label:<28} {strategy:<16} {ms:8.1f} ms per query", flush=True)
    return out


def engine_table(n_items: int, target, base: Path) -> dict:
    out = {}
    for backend in ("faiss", "milvus"):
        root = base / backend
        build_catalogue_bundle(
            root, n_items=n_items, n_users=2000, n_ratings=100_000, milvus=target if backend == "milvus" else None
        )
        engine = Engine.load(root)
        rng = np.random.default_rng(0)
        users = engine.users.ids[rng.choice(len(engine.users), 200, replace=False)]
        items = engine.items.ids[rng.choice(len(engine.items), (50, 3), replace=True)]
        for u in users[:20]:
            engine.recommend(u)
        known = []
        for u in users:
            start = time.perf_counter()
            engine.recommend(u)
            known.append(time.perf_counter() - start)
        folded = []
        for row in items:
            start = time.perf_counter()
            engine.recommend(ratings={str(i): 5 for i in row})
            folded.append(time.perf_counter() - start)
        out[backend] = {"known_p50_ms": float(np.median(known) * 1e3), "fold_in_p50_ms": float(np.median(folded) * 1e3)}
        print(
            f"  {backend:<7} known user p50 {out[backend]['known_p50_ms']:7.2f} ms   "
            f"fold-in user (searches) p50 {out[backend]['fold_in_p50_ms']:8.2f} ms",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--single", type=int, default=30, help="single Milvus queries timed (slow on Lite)")
    parser.add_argument("--engine-items", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, args.dim)).astype(np.float32)
    vectors = (centres[rng.integers(0, 200, args.n)] + 0.5 * rng.normal(size=(args.n, args.dim))).astype(np.float32)
    queries = (centres[rng.integers(0, 200, args.queries)] + 0.5 * rng.normal(size=(args.queries, args.dim))).astype(
        np.float32
    )
    with tempfile.TemporaryDirectory() as tmp:
        target = milvus_index.MilvusTarget.of(str(Path(tmp) / "bench.db"))
        print(f"search on {args.n:,} x {args.dim} (inner product), {args.queries} queries:", flush=True)
        # A "genres" attribute of ten labels, each on about 30% of the items.
        flags = (rng.random((args.n, 10)) < 0.3).astype(np.uint8)
        attributes = ItemAttributes({"genres": Attribute(LABELS, flags, tuple(f"g{j}" for j in range(10)))})
        searches = search_table(vectors, queries, target, args.single, attributes)
        index = searches.pop("_milvus_index")
        print("filters on Milvus Lite:", flush=True)
        filters = filter_table(index, attributes, args.n, queries[: args.single])
        print(f"engine recommend on a {args.engine_items:,}-item catalogue:", flush=True)
        engine = engine_table(args.engine_items, target, Path(tmp))
    out = save_result(
        "milvus", {"n": args.n, "dim": args.dim, "search": searches, "filters_ms": filters, "engine": engine}
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
