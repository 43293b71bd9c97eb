"""Benchmark B4: approximate nearest-neighbour retrieval against exact search.

1M x 32 clustered vectors (2,000 centres, like trained embeddings) and 1,000 held-out
queries, k = 10; then the item vectors Tandem trains on ML-100K. For exact search
(IndexFlat), HNSW32 at several efSearch and IVF at several nprobe: recall@10 against
exact, single-query QPS (one query per call, one thread), batched QPS (all queries in
one call, all threads), build seconds and index size. Also Tandem's own path
(``engine.index.faiss_index.build_index``, which picks and tunes the index to the 0.95 floor), to
show it loses nothing against raw FAISS.

Target: an operating point with recall@10 >= 0.95 at >= 10x the single-query QPS of
exact search.

Usage: python bench/ann.py [--n 1000000] [--dim 32] [--queries 1000]
Writes bench/results/ann.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
from _results import save_result

from engine.evaluation.metrics import ann_recall_at_k
from engine.index import faiss_index as ann


def clustered(n: int, dim: int, n_centres: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_centres, dim)).astype(np.float32)
    assign = rng.integers(0, n_centres, n)
    return (centres[assign] + rng.normal(0, 0.8, (n, dim)).astype(np.float32)), centres


def single_query_qps(index, queries: np.ndarray, k: int, max_queries: int) -> float:
    faiss.omp_set_num_threads(1)
    q = queries[:max_queries]
    start = time.perf_counter()
    for row in q:
        index.search(row[None, :], k)
    elapsed = time.perf_counter() - start
    faiss.omp_set_num_threads(THREADS)
    return len(q) / elapsed


def batched_qps(index, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - start)


def run_suite(
    name: str,
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
    hnsw_ef: list[int],
    ivf_nprobe: list[int],
    nlist: int,
    exact_single_queries: int,
) -> list[dict]:
    rows = []
    dim = base.shape[1]
    metric_id = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    start = time.perf_counter()
    flat = faiss.IndexFlat(dim, metric_id)
    flat.add(base)
    flat_build = time.perf_counter() - start
    _, exact = flat.search(queries, k)
    rows.append(
        {
            "suite": name,
            "index": "Flat (exact)",
            "params": "",
            "recall@10": 1.0,
            "single_qps": single_query_qps(flat, queries, k, exact_single_queries),
            "batched_qps": batched_qps(flat, queries, k),
            "build_s": flat_build,
            "size_mb": base.nbytes / 1e6,
        }
    )
    print(f"  {name}: exact done", flush=True)

    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, metric_id)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(base)
    hnsw_build = time.perf_counter() - start
    hnsw_size = len(faiss.serialize_index(hnsw)) / 1e6
    for ef in hnsw_ef:
        hnsw.hnsw.efSearch = ef
        _, got = hnsw.search(queries, k)
        rows.append(
            {
                "suite": name,
                "index": "HNSW32",
                "params": f"efSearch={ef}",
                "recall@10": ann_recall_at_k(got, exact, k),
                "single_qps": single_query_qps(hnsw, queries, k, len(queries)),
                "batched_qps": batched_qps(hnsw, queries, k),
                "build_s": hnsw_build,
                "size_mb": hnsw_size,
            }
        )
    print(f"  {name}: HNSW done", flush=True)

    nlist = min(nlist, len(base) // 39)
    start = time.perf_counter()
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", metric_id)
    rng = np.random.default_rng(0)
    ivf.train(base[rng.choice(len(base), min(len(base), 200_000), replace=False)])
    ivf.add(base)
    ivf_build = time.perf_counter() - start
    ivf_size = len(faiss.serialize_index(ivf)) / 1e6
    for nprobe in ivf_nprobe:
        if nprobe > nlist:
            continue
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        _, got = ivf.search(queries, k)
        rows.append(
            {
                "suite": name,
                "index": f"IVF{nlist},Flat",
                "params": f"nprobe={nprobe}",
                "recall@10": ann_recall_at_k(got, exact, k),
                "single_qps": single_query_qps(ivf, queries, k, len(queries)),
                "batched_qps": batched_qps(ivf, queries, k),
                "build_s": ivf_build,
                "size_mb": ivf_size,
            }
        )
    print(f"  {name}: IVF done", flush=True)

    # Tandem's own path: choose by size and tune to the floor on a build-time query sample.
    index, report = ann.build_index(base, metric, queries=queries[: len(queries) // 2], k=k, recall_floor=0.95)
    held_out = queries[len(queries) // 2 :]
    _, got = index.search(held_out, k)
    rows.append(
        {
            "suite": name,
            "index": f"tandem {report.factory}",
            "params": json.dumps(report.search_params),
            "recall@10": ann_recall_at_k(got, exact[len(queries) // 2 :], k),
            "single_qps": single_query_qps(
                index, held_out, k, len(held_out) if "HNSW" in report.factory else exact_single_queries
            ),
            "batched_qps": batched_qps(index, held_out, k),
            "build_s": report.build_seconds,
            "size_mb": len(faiss.serialize_index(index.index)) / 1e6,
        }
    )
    exact_qps = rows[0]["single_qps"]
    for r in rows:
        r["single_vs_exact"] = r["single_qps"] / exact_qps
    return rows


def ml100k_vectors() -> tuple[np.ndarray, np.ndarray] | None:
    from engine import data
    from engine.config import resolve_data_source
    from engine.models.cf import train_cf

    src = Path(resolve_data_source("auto"))
    if not (src / "u.data").is_file():
        return None
    model = train_cf(data.load(src), progress=False)
    return model.X, model.X  # "more like this": every item queries its neighbours


THREADS = faiss.omp_get_max_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--exact-single-queries", type=int, default=200, help="queries timed one by one for exact search (it is slow)"
    )
    args = parser.parse_args()

    print(f"generating {args.n:,} x {args.dim} clustered vectors ...", flush=True)
    base, _ = clustered(args.n + args.queries, args.dim, 2000, seed=0)
    base, queries = base[: args.n], base[args.n :]
    rows = run_suite(
        f"clustered {args.n // 1000}k x {args.dim}",
        base,
        queries,
        10,
        "l2",
        [16, 32, 64, 128, 256],
        [1, 4, 16, 64],
        4096,
        args.exact_single_queries,
    )
    ml = ml100k_vectors()
    if ml is not None:
        items, _ = ml
        rows += run_suite(
            "ML-100K CF item vectors",
            np.ascontiguousarray(items),
            np.ascontiguousarray(items),
            10,
            "l2",
            [16, 32, 64],
            [1, 4, 16],
            40,
            len(items),
        )
    out = save_result("ann", rows)
    print(
        f"\nB4 (k=10; single = one query per call, 1 thread; batched = {args.queries} queries per call, "
        f"{THREADS} threads)"
    )
    print(
        f"{'suite':<26}{'index':<22}{'params':<16}{'recall@10':>10}{'single QPS':>12}{'x exact':>9}"
        f"{'batched QPS':>13}{'build s':>9}{'MB':>8}"
    )
    for r in rows:
        print(
            f"{r['suite']:<26}{r['index']:<22}{r['params']:<16}{r['recall@10']:>10.4f}{r['single_qps']:>12,.0f}"
            f"{r['single_vs_exact']:>9.1f}{r['batched_qps']:>13,.0f}{r['build_s']:>9.1f}{r['size_mb']:>8.1f}"
        )
    best = [
        r for r in rows if r["suite"].startswith("clustered") and r["recall@10"] >= 0.95 and r["single_vs_exact"] >= 10
    ]
    verdict = (
        f"met: {best[0]['index']} {best[0]['params']} recall {best[0]['recall@10']:.3f} at "
        f"{best[0]['single_vs_exact']:.0f}x exact"
        if best
        else "NOT met"
    )
    print(f"\nTarget (recall@10 >= 0.95 at >= 10x exact single-query QPS): {verdict} -> {out}")


if __name__ == "__main__":
    main()
