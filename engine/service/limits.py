"""The server's own request limits, and what it reports of itself: shared by the gRPC
servicers (:mod:`engine.service.servicers`) and the HTTP face (:mod:`engine.service.http`),
so that both refuse the same requests with the same messages and describe the bundle
alike. The engine validates everything else (ids, k, features, filters, events)."""

from __future__ import annotations

import time

from engine.errors import InvalidRequest
from engine.service.holder import EngineHolder
from engine.serving.engine import Engine
from engine.settings import ServerConfig

# An error message is cut to this many characters (gRPC carries it in the metadata; the
# HTTP face answers it in the JSON body): a message never echoes a huge value back.
MAX_MESSAGE = 1000


def capped(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE` characters."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


class LimitExceeded(InvalidRequest):
    """A request the server's own limits refuse (gRPC INVALID_ARGUMENT, HTTP 400)."""


def check_batch(n: int, what: str, config: ServerConfig) -> None:
    """At most ``server.max_batch`` users, items or events in one request."""
    if n > config.max_batch:
        raise LimitExceeded(f"{n} {what} in one request; at most {config.max_batch}")


def check_batch_results(n_users: int, k: int, config: ServerConfig) -> None:
    """At most ``server.max_batch_results`` results (users x k) in one batch reply."""
    check_batch(n_users, "users", config)
    if n_users * k > config.max_batch_results:
        raise LimitExceeded(
            f"{n_users} users x k={k} results in one batch; at most {config.max_batch_results:,} "
            "(server.max_batch_results): send fewer users or a smaller k"
        )


def check_scored(n_items: int, engine: Engine) -> None:
    """At most ``engine.max_candidates`` items to score in one request."""
    if n_items > engine.config.max_candidates:
        raise LimitExceeded(f"{n_items} items to score; at most {engine.config.max_candidates}")


def check_size(n_bytes: int, config: ServerConfig) -> None:
    """At most ``server.max_message_bytes`` bytes in one request."""
    if n_bytes > config.max_message_bytes:
        raise LimitExceeded(f"request of {n_bytes:,} bytes; at most {config.max_message_bytes:,}")


def server_info(holder: EngineHolder, config: ServerConfig) -> dict:
    """The served bundle and this server, as GetInfo and ``GET /v1/info`` report them
    (the fields of ``GetInfoResponse`` in protos/tandem/v1/tandem.proto)."""
    engine = holder.engine
    manifest = engine.bundle.manifest
    tabled = {"cf_ip": engine.sources["cf"].top_items, "towers_ip": engine.sources["towers"].top_items}
    indexes = [
        {
            "name": name,
            "factory": r["factory"],
            "metric": r["metric"],
            "n_vectors": r["n_vectors"],
            "dim": r["dim"],
            "search_params": {k: int(v) for k, v in (r["search_params"] or {}).items()},
            "recall_at_k": float(r["recall_at_k"] or 0.0),
            "k": int(r["k"]),
            "user_top_k": 0 if tabled.get(name) is None else int(tabled[name].shape[1]),
        }
        for name, r in manifest.indexes.items()
    ]
    ranker = engine.ranker
    return {
        "version": engine.version,
        "created_at": manifest.created_at,
        "n_items": len(engine.items),
        "n_users": len(engine.users),
        "dataset": manifest.dataset.name,
        "data_fingerprint": manifest.dataset.fingerprint,
        "indexes": indexes,
        "sources": sorted(engine.sources),
        "max_k": engine.config.max_k,
        "max_candidates": engine.config.max_candidates,
        "max_batch": config.max_batch,
        "loaded_seconds_ago": time.time() - holder.loaded_at,
        "reloads": holder.reloads,
        "ranking": "blend" if ranker is None else "ranker",
        "ranker_trees": 0 if ranker is None else ranker.trees.n_trees,
        "ranker_depth": 0 if ranker is None else ranker.depth,
        "ranker_features": [] if ranker is None else ranker.feature_names,
        "feedback_events": engine.feedback.n_events,
        "feedback_users": engine.feedback.n_users,
        "feedback_skipped": engine.feedback.skipped,
    }
