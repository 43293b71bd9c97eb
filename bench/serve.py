"""Benchmark B5: the gRPC service under load, on a 100k-item synthetic catalogue.

A real ``tandem serve`` process (or several sharing one port through SO_REUSEPORT with
``--processes``) and load-generator processes on loopback. For ``Recommend`` (known
users, k = 10, 500 candidates), ``SimilarItems`` (k = 10) and the trivial ``Echo`` rpc
(the ceiling, measured in the same run), at 1, 4 and 16 concurrent clients: QPS and
p50/p99 latency. Target: Recommend QPS >= 0.4x Echo at 4 clients, p99 <= 10 ms at 4
clients.

Usage: python bench/serve.py [--bundle ROOT] [--seconds 4] [--processes 1]
Without --bundle it builds one (quick models; latency does not depend on their quality).
Writes bench/results/serve.json and prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _catalogue import build_catalogue_bundle
from _results import save_result

CONCURRENCY = (1, 4, 16)
RPCS = ("Echo", "Recommend", "SimilarItems")


def client_worker(target: str, rpc: str, threads: int, seconds: float, users, items, seed: int, out) -> None:
    """One load-generator process: ``threads`` clients, each with its own channel,
    calling ``rpc`` back to back for ``seconds``; sends its latencies to ``out``."""
    import threading

    import grpc

    from engine.rpc import tandem_pb2 as pb
    from engine.rpc import tandem_pb2_grpc as pb_grpc

    latencies: list[float] = []
    lock = threading.Lock()
    start_at = time.time() + 0.5

    def run(t: int) -> None:
        rng = np.random.default_rng(seed * 100 + t)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            calls = {"Echo": lambda: stub.Echo(pb.EchoRequest(payload=b"x" * 16), timeout=10),
                     "Recommend": lambda: stub.Recommend(pb.RecommendRequest(
                         user_id=users[rng.integers(len(users))], k=10, n_candidates=500), timeout=10),
                     "SimilarItems": lambda: stub.SimilarItems(pb.SimilarItemsRequest(
                         item_id=items[rng.integers(len(items))], k=10), timeout=10)}
            call = calls[rpc]
            for _ in range(20):  # warm the channel
                call()
            mine = []
            while time.time() < start_at:
                time.sleep(0.001)
            end = start_at + seconds
            while True:
                t0 = time.perf_counter()
                call()
                mine.append(time.perf_counter() - t0)
                if time.time() >= end:
                    break
            with lock:
                latencies.extend(mine)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(latencies)


def measure(target: str, rpc: str, clients: int, seconds: float, users, items) -> dict:
    processes = min(clients, 4)  # the load generator itself must not be the bottleneck
    per = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=client_worker, args=(target, rpc, n, seconds, users, items, p, queue))
             for p, n in enumerate(per)]
    for p in procs:
        p.start()
    latencies = np.concatenate([np.asarray(queue.get(), float) for _ in procs])
    for p in procs:
        p.join()
    return {"qps": len(latencies) / seconds, "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3), "requests": int(len(latencies))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an existing bundle root to serve (default: build a 100k-item one)")
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement time per cell")
    parser.add_argument("--processes", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--workers", type=int, default=8, help="request threads per server process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.bundle) if args.bundle else Path(tmp) / "bundles"
        if not args.bundle:
            build_catalogue_bundle(root, args.n_items)
        from engine import bundle

        tables = bundle.resolve(root) / "tables"
        users = [str(u) for u in np.load(tables / "user_ids.npy", allow_pickle=False)[:5000]]
        items = [str(i) for i in np.load(tables / "item_ids.npy", allow_pickle=False)[:20000]]
        port = free_port()
        servers = []
        for p in range(args.processes):
            ready = Path(tmp) / f"port{p}"
            servers.append((subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--bundle", str(root), "--port", str(port),
                 "--workers", str(args.workers), "--port-file", str(ready), "--log-level", "WARNING"],
                env={**os.environ, "TANDEM_TOKEN": ""}), ready))
        try:
            for proc, ready in servers:
                deadline = time.time() + 180
                while not ready.exists():
                    if proc.poll() is not None or time.time() > deadline:
                        raise SystemExit("a server process failed to start")
                    time.sleep(0.2)
            target = f"127.0.0.1:{port}"
            print(f"serving {root} on {target} with {args.processes} process(es) x {args.workers} threads",
                  flush=True)
            table = {}
            for clients in CONCURRENCY:
                for rpc in RPCS:
                    table[f"{rpc}@{clients}"] = row = measure(target, rpc, clients, args.seconds, users, items)
                    print(f"  {rpc:<13} {clients:>2} clients: {row['qps']:>8,.0f} QPS  p50 {row['p50_ms']:6.2f} ms  "
                          f"p99 {row['p99_ms']:6.2f} ms", flush=True)
        finally:
            for proc, _ in servers:
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers:
                proc.wait(timeout=60)

    ratio = table["Recommend@4"]["qps"] / table["Echo@4"]["qps"]
    result = {"n_items": args.n_items if not args.bundle else None, "processes": args.processes,
              "workers": args.workers, "seconds_per_cell": args.seconds, "cpu_count": os.cpu_count(),
              "table": table, "recommend_over_echo_at_4": ratio}
    out = save_result("serve" if args.processes == 1 else f"serve_{args.processes}proc", result)
    print(f"\nRecommend / Echo QPS at 4 clients: {ratio:.2f} (target >= 0.40); Recommend p99 at 4 clients "
          f"{table['Recommend@4']['p99_ms']:.2f} ms (target <= 10) -> {out}")


if __name__ == "__main__":
    main()
