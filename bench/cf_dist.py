"""Benchmark of data-parallel CF training: one epoch of minibatch Adam on synthetic 20M
ratings (as B6, ``bench/cf_scale.py``) with 1 and with 2 processes, in one run, each
started by ``torchrun`` (gloo): ratings/s of the epoch, the whole ``train_cf`` call, peak
RSS per rank, and the scaling efficiency (rate with N processes / N x rate with one).

Every rank generates the whole synthetic dataset (the generator makes no shards) and
trains on its share of it; the peak RSS counts the data with the replicated tables.

Usage: python bench/cf_dist.py [--n-ratings 20000000] [--processes 1,2]
Writes bench/results/cf_dist.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import save_result
from cf_scale import add_b6_flags


def worker(args) -> None:
    from cf_scale import b6_data, b6_epoch

    from engine.models.distributed import init_from_environment

    rank, size = init_from_environment()
    ds = b6_data(args)
    model, call_s = b6_epoch(ds, args)
    report = {
        "rank": rank,
        "processes": size,
        "ratings_per_s_epoch": model.metrics["ratings_per_second"],
        "ratings_per_s_whole_call": ds.n_ratings / call_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
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
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in [int(p) for p in args.processes.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
            command += ["--master_port", str(free_port()), __file__, "--worker", "--out", out]
            for name in ("n_users", "n_items", "n_ratings", "batch_size", "n_features"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            subprocess.run(command, check=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
        first = ranks[0]
        rows.append(
            {
                "processes": n,
                "ratings_per_s_epoch": first["ratings_per_s_epoch"],
                "ratings_per_s_whole_call": first["ratings_per_s_whole_call"],
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
        print(
            f"  {row['processes']} process(es): {row['ratings_per_s_epoch'] / 1e6:.2f} M ratings/s (epoch), "
            f"{row['ratings_per_s_whole_call'] / 1e6:.2f} M/s (whole call); efficiency {row['efficiency']:.2f}; "
            f"peak RSS per rank {rss} GB"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
