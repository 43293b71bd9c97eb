"""Benchmark of live feedback (``RecordFeedback``, ``Engine.record``).

1. **Throughput**: ``RecordFeedback`` batches of 100 events against one ``tandem serve``
   process, fsync per batch (the default), from client threads in this process, for a
   few seconds; beside it ``Engine.record`` in-process. Target: >= 20,000 events/s.
2. **SIGKILL trials**: bursts of batches from two client threads; the server is killed
   with SIGKILL at a random moment; every event of an acknowledged batch must be in the
   log and replayed by the next load (events lost must be 0).
3. **Memory**: the live state's bytes per million events (``LiveFeedback.nbytes``).

Usage: python bench/feedback.py [--seconds 5] [--trials 10] [--memory-events 1000000]
Writes bench/results/feedback.json and prints a summary.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from _catalogue import build_catalogue_bundle
from _results import save_result

from engine import Engine
from engine.data.feedback import FEEDBACK_LOG, read_log
from engine.service.processes import spawn_server
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc

BATCH = 100


def batches(engine: Engine, n: int, seed: int, prefix: str = "") -> list[pb.RecordFeedbackRequest]:
    """``n`` request messages of BATCH events: known users and new ones, random items."""
    rng = np.random.default_rng(seed)
    users, items = engine.users.ids, engine.items.ids
    out = []
    for b in range(n):
        who = rng.integers(0, len(users), BATCH)
        new = rng.random(BATCH) < 0.2
        events = [
            pb.FeedbackEvent(
                user_id=f"{prefix}new-{seed}-{b}-{j}" if new[j] else str(users[who[j]]),
                item_id=str(items[i]),
                kind="click" if j % 3 else "view",
                timestamp=float(b * BATCH + j),
            )
            for j, i in enumerate(rng.integers(0, len(items), BATCH))
        ]
        out.append(pb.RecordFeedbackRequest(events=events))
    return out


def throughput(root: Path, engine: Engine, seconds: float, clients: int) -> dict:
    proc, port = spawn_server(root, root.parent / f"port-clients{clients}", "--log-level", "WARNING")
    prepared = [batches(engine, 200, seed) for seed in range(clients)]
    done = [0] * clients
    stop = threading.Event()

    def client(c: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            n = 0
            while not stop.is_set():
                stub.RecordFeedback(prepared[c][n % len(prepared[c])], timeout=30)
                n += 1
            done[c] = n

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # warm-up
            pb_grpc.RecommenderStub(channel).RecordFeedback(prepared[0][0], timeout=30)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"clients": clients, "events_per_s": sum(done) * BATCH / elapsed, "batches": sum(done)}


def in_process(engine: Engine, n_batches: int = 300) -> float:
    """Engine.record of BATCH-event batches (validated, logged, fsynced, applied): events/s."""
    users, items = engine.users.ids, engine.items.ids
    rng = np.random.default_rng(2)
    prepared = [
        [
            {"user_id": str(users[u]), "item_id": str(items[i]), "kind": "click"}
            for u, i in zip(*rng.integers(0, 1000, (2, BATCH)))
        ]
        for _ in range(n_batches)
    ]
    start = time.perf_counter()
    for events in prepared:
        engine.record(events)
    return n_batches * BATCH / (time.perf_counter() - start)


def sigkill_trials(root: Path, engine: Engine, trials: int) -> dict:
    rng = np.random.default_rng(3)
    lost_total, acknowledged_total = 0, 0
    for trial in range(trials):
        proc, port = spawn_server(root, root.parent / f"port{trial}", "--log-level", "WARNING")
        prepared = [batches(engine, 60, 100 + 10 * trial + w, prefix=f"t{trial}w{w}-") for w in range(2)]
        acknowledged: list[tuple[str, float]] = []
        lock = threading.Lock()

        def burst(w: int, port: int = port, prepared=prepared, acknowledged=acknowledged, lock=lock) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RecommenderStub(channel)
                for request in prepared[w]:
                    try:
                        stub.RecordFeedback(request, timeout=30)
                    except grpc.RpcError:
                        return
                    with lock:
                        acknowledged.extend((e.user_id, e.timestamp) for e in request.events if "new-" in e.user_id)

        threads = [threading.Thread(target=burst, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        time.sleep(float(rng.uniform(0.05, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for t in threads:
            t.join()
        logged, _ = read_log(root / FEEDBACK_LOG)
        present = set(zip(logged.user_ids, logged.timestamps.tolist()))
        lost = sum(1 for key in acknowledged if key not in present)
        replayed = Engine.load(root).feedback.n_events
        assert replayed == len(logged), (replayed, len(logged))
        lost_total += lost
        acknowledged_total += len(acknowledged)
        print(f"  trial {trial + 1}: {len(acknowledged):,} acknowledged new-user events, {lost} lost", flush=True)
    return {"trials": trials, "acknowledged_events_checked": acknowledged_total, "events_lost": lost_total}


def memory(engine: Engine, n_events: int) -> dict:
    users, items = engine.users.ids, engine.items.ids
    rng = np.random.default_rng(4)
    chunk = 10_000
    start = time.perf_counter()
    for _ in range(0, n_events, chunk):
        u = rng.integers(0, len(users) * 2, chunk)  # half of them new users
        i = rng.integers(0, len(items), chunk)
        engine.record(
            [
                {"user_id": str(users[x]) if x < len(users) else f"m{x}", "item_id": str(items[y]), "kind": "view"}
                for x, y in zip(u.tolist(), i.tolist())
            ],
            persist=False,
        )
    seconds = time.perf_counter() - start
    feedback = engine.feedback
    return {
        "events": feedback.n_events,
        "users_with_events": feedback.n_users,
        "bytes": feedback.nbytes,
        "bytes_per_million_events": feedback.nbytes / feedback.n_events * 1e6,
        "record_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--memory-events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        build_catalogue_bundle(root, n_items=10_000, n_users=5_000, n_ratings=200_000)
        engine = Engine.load(root)
        result = {"batch_events": BATCH, "fsync": engine.config.feedback.fsync}
        print("RecordFeedback throughput ...", flush=True)
        result["grpc"] = [throughput(root, engine, args.seconds, clients) for clients in (1, args.clients)]
        result["in_process_events_per_s"] = in_process(Engine.load(root))
        print("SIGKILL trials ...", flush=True)
        result["sigkill"] = sigkill_trials(root, engine, args.trials)
        print("memory ...", flush=True)
        result["memory"] = memory(Engine.load(root), args.memory_events)
    out = save_result("feedback", result)
    s, m = result["sigkill"], result["memory"]
    for g in result["grpc"]:
        print(
            f"RecordFeedback, {BATCH}-event batches, fsync {result['fsync']}, one server process, "
            f"{g['clients']} client(s): {g['events_per_s']:,.0f} events/s (target >= 20,000)"
        )
    print(f"Engine.record in-process: {result['in_process_events_per_s']:,.0f} events/s")
    checked = s["acknowledged_events_checked"]
    print(f"SIGKILL: {s['trials']} trials, {checked:,} acknowledged events checked, {s['events_lost']} lost")
    print(
        f"memory: {m['events']:,} events of {m['users_with_events']:,} users in {m['bytes'] / 1e6:.1f} MB "
        f"({m['bytes_per_million_events'] / 1e6:.1f} MB per million events) -> {out}"
    )


if __name__ == "__main__":
    main()
