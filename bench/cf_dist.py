"""Benchmark of data-parallel CF training: one epoch of minibatch Adam on synthetic 20M
ratings (as B6, ``bench/cf_scale.py``) with 1 and with 2 processes, in one run, each
started by ``torchrun`` (gloo): ratings/s of the epoch, the whole ``train_cf`` call, peak
RSS per rank, and the scaling efficiency (rate with N processes / N x rate with one).

The data is generated once and written as user-partitioned parts (``tandem data shard``,
engine/data/shards.py); each rank reads only its parts, and holds its users' rows of the
user table and a replica of the item table, so its peak RSS is what a rank needs.

Usage: python bench/cf_dist.py [--n-ratings 20000000] [--processes 1,2]
Writes bench/results/cf_dist.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save_result
from cf_scale import add_b6_flags


def worker(args) -> None:
    from cf_scale import b6_epoch

    from engine.data import read_shards
    from engine.models.distributed import init_from_environment

    rank, size = init_from_environment()
    start = time.perf_counter()
    ds = read_shards(args.shards, rank, size)
    read_s = time.perf_counter() - start
    model, call_s = b6_epoch(ds, args)
    report = {
        "rank": rank,
        "processes": size,
        "ratings_read": ds.n_ratings,
        "read_s": read_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    if model is not None:  # rank 0
        n_ratings = ds.shard_of["n_ratings"] if ds.shard_of else ds.n_ratings
        report.update(
            ratings_per_s_epoch=model.metrics["ratings_per_second"], ratings_per_s_whole_call=n_ratings / call_s
        )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_b6_flags(parser)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from cf_scale import b6_data

    from engine.data import write_shards

    processes = [int(p) for p in args.processes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch, "shards")
        write_shards(b6_data(args), shards, parts=math.lcm(*processes))
        for n in processes:
            out = Path(scratch, f"run{n}")
            out.mkdir()
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
            command += ["--master_port", str(free_port()), __file__, "--worker", "--out", str(out)]
            command += ["--shards", str(shards)]
            for name in ("batch_size", "n_features"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            subprocess.run(command, check=True)
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            first = ranks[0]
            rows.append(
                {
                    "processes": n,
                    "ratings_per_s_epoch": first["ratings_per_s_epoch"],
                    "ratings_per_s_whole_call": first["ratings_per_s_whole_call"],
                    "ratings_read_per_rank": [r["ratings_read"] for r in ranks],
                    "read_s_per_rank": [r["read_s"] for r in ranks],
                    "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in ranks],
                }
            )
    base = rows[0]["ratings_per_s_epoch"]
    for row in rows:
        row["efficiency"] = row["ratings_per_s_epoch"] / (row["processes"] * base)
    out = save_result("cf_dist", {"n_ratings": args.n_ratings, "batch_size": args.batch_size, "runs": rows})
    print(f"CF, one epoch of {args.n_ratings:,} ratings, batch {args.batch_size:,} (all ranks together):")
    for row in rows:
        rss = ", ".join(f"{x:.2f}" for x in row["peak_rss_gb_per_rank"])
        read = ", ".join(f"{x / 1e6:.1f} M" for x in row["ratings_read_per_rank"])
        print(
            f"  {row['processes']} process(es): {row['ratings_per_s_epoch'] / 1e6:.2f} M ratings/s (epoch), "
            f"{row['ratings_per_s_whole_call'] / 1e6:.2f} M/s (whole call); efficiency {row['efficiency']:.2f}; "
            f"ratings read per rank {read}; peak RSS per rank {rss} GB"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
