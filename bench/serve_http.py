"""Benchmark B5 for the HTTP/JSON face beside gRPC, in one run: one ``tandem serve
--http-port`` process on a 100k-item synthetic catalogue, and load-generator processes
on loopback (the harness of bench/serve.py), at 1, 4 and 16 concurrent clients:

- ``Recommend`` over gRPC and ``POST /v1/recommend`` over HTTP (known users, k = 10,
  500 candidates; the same engine answers both);
- each face's trivial call, its ceiling: gRPC ``Echo`` (its payload the size of a
  Recommend reply) and HTTP ``GET /healthz``.

QPS and p50/p99 latency per cell; the HTTP / gRPC ratios of Recommend's p50 and QPS.
The HTTP clients keep one connection each (``http.client``, keep-alive), as the gRPC
clients keep one channel.

Usage: python bench/serve_http.py [--bundle ROOT] [--seconds 3] [--ranking auto]
Writes bench/results/serve_http.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import tempfile
from pathlib import Path

import numpy as np
from _catalogue import build_catalogue_bundle
from _results import save_result
from serve import CONCURRENCY, _server_pids, measure, reply_size

from engine.service.processes import spawn_server


@contextlib.contextmanager
def http_calls(target: str, rpc: str, rng, users, items, echo_bytes: int):
    """One client's keep-alive connection, as a function making one call: ``Recommend``
    (``POST /v1/recommend``) or ``Health`` (``GET /healthz``)."""
    host, port = target.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}

    def exchange(method: str, path: str, body: bytes | None = None) -> bytes:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return data

    calls = {
        "Recommend": lambda: exchange(
            "POST",
            "/v1/recommend",
            json.dumps({"user_id": users[rng.integers(len(users))], "k": 10, "n_candidates": 500}).encode(),
        ),
        "Health": lambda: exchange("GET", "/healthz"),
    }
    try:
        yield calls[rpc]
    finally:
        connection.close()


CELLS = (("grpc", "Echo"), ("grpc", "Recommend"), ("http", "Health"), ("http", "Recommend"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an existing bundle root to serve (default: build a 100k-item one)")
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per cell")
    parser.add_argument("--workers", type=int, default=2, help="gRPC request threads (server.workers)")
    parser.add_argument("--ranking", default="auto", help="engine.ranking: auto (the bundle's ranker) or blend")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.bundle) if args.bundle else Path(tmp) / "bundles"
        if not args.bundle:
            build_catalogue_bundle(root, args.n_items)
        from engine.index import bundle

        layout = bundle.BundleLayout(bundle.resolve(root))
        users = [str(u) for u in layout.load_table("user_ids")[:5000]]
        items = [str(i) for i in layout.load_table("item_ids")[:20000]]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            http_port = probe.getsockname()[1]
        server, port = spawn_server(
            root,
            Path(tmp) / "port",
            "--http-port",
            str(http_port),
            "--workers",
            str(args.workers),
            "--log-level",
            "WARNING",
            settings=(f"engine.ranking={args.ranking}",),
            timeout=300,
        )
        try:
            targets = {"grpc": f"127.0.0.1:{port}", "http": f"127.0.0.1:{http_port}"}
            openers = {"grpc": "grpc_calls", "http": "serve_http.http_calls"}
            pids = _server_pids(server.pid, 1)
            echo_bytes = reply_size(targets["grpc"], users[0])
            print(f"one process: gRPC on :{port} ({args.workers} threads), HTTP on :{http_port}; {args.ranking}")
            table = {}
            for clients in CONCURRENCY:
                for face, rpc in CELLS:
                    row = measure(
                        targets[face], rpc, clients, args.seconds, users, items, echo_bytes, pids, openers[face]
                    )
                    table[f"{face} {rpc}@{clients}"] = row
                    print(
                        f"  {face:<4} {rpc:<10} {clients:>2} clients: {row['qps']:>7,.0f} QPS  "
                        f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                        f"server CPU/request {row['server_cpu_ms_per_request']:.2f} ms",
                        flush=True,
                    )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
        ratios = {
            clients: {
                "p50": table[f"http Recommend@{clients}"]["p50_ms"] / table[f"grpc Recommend@{clients}"]["p50_ms"],
                "qps": table[f"http Recommend@{clients}"]["qps"] / table[f"grpc Recommend@{clients}"]["qps"],
            }
            for clients in CONCURRENCY
        }
        for clients, r in ratios.items():
            print(f"  Recommend, HTTP / gRPC at {clients:>2} clients: p50 x{r['p50']:.2f}, QPS x{r['qps']:.2f}")
        out = save_result(
            "serve_http",
            {
                "n_items": args.n_items if not args.bundle else None,
                "seconds_per_cell": args.seconds,
                "cpu_count": os.cpu_count(),
                "ranking": args.ranking,
                "table": table,
                "http_over_grpc": {str(c): r for c, r in ratios.items()},
                "median_http_over_grpc_p50": float(np.median([r["p50"] for r in ratios.values()])),
            },
        )
        print(f"  -> {out}")


if __name__ == "__main__":
    main()
