"""The end-to-end demo's last step (``make demo``): serve the published bundle with a
real ``tandem serve`` process (gRPC, and HTTP/JSON with the web page), query it as a
client would, print the answers, stop it, and say how to open the page (``make web``).

Usage: python -m engine.demo [--bundle ROOT]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from engine.config import load_config
from engine.errors import ServeError
from engine.service.client import Client
from engine.service.processes import spawn_server


def _print(title: str, recs, distance: bool = False) -> None:
    print(f"\n{title}" + (f" (served by: {recs.served_by})" if recs.served_by else ""))
    width = max((len(t) for t in recs.titles), default=0)
    for rank, (_item_id, score, sources) in enumerate(recs, 1):
        label = "distance" if distance else "score"
        via = "" if distance else f"  via {', '.join(sources)}"
        print(f"  {rank:>2}. {recs.titles[rank - 1]:<{width}}  ({label} {score:.3f}){via}")


def example_ids(root: str | Path) -> tuple[str, str]:
    """The most active user and the most popular item of the bundle ``current`` points
    at (read from its tables; no engine needed): what the examples show."""
    from engine.index import bundle

    load = bundle.BundleLayout(bundle.resolve(root)).load_table
    user = load("user_ids")[int(np.argmax(np.diff(load("seen_indptr"))))]
    return str(user), str(load("item_ids")[int(np.argmax(load("popularity")))])


def example_new_user(root: str | Path) -> tuple[str, dict]:
    """A new user this bundle can serve, as ``(description, recommend keyword
    arguments)``: the raw features of its most active user when the data has user
    features (the user tower serves a new user from them), else a few top ratings of
    its most popular items (CF fold-in serves those)."""
    from engine.index import bundle
    from engine.models.cf import CFModel
    from engine.models.towers import TwoTowerModel

    layout = bundle.BundleLayout(bundle.resolve(root))
    user = int(np.argmax(np.diff(layout.load_table("seen_indptr"))))
    features = TwoTowerModel.load(layout.model("towers")).raw_user_features(user)
    if features:
        return f"a new user known only by features {features}", {"user_features": features}
    popular = layout.load_table("item_ids")[np.argsort(-layout.load_table("popularity"), kind="stable")[:3]]
    top = CFModel.load(layout.model("cf")).rating_range[1]
    ratings = {str(i): top for i in popular}
    return f"a new user who rated the three most popular items {top:g} ({', '.join(ratings)})", {"ratings": ratings}


def example_filter(root: str | Path) -> tuple[str, dict] | None:
    """An attribute filter of this bundle's items, as ``(description, filters)``: the
    most common value of its first labels or categorical attribute (genres on MovieLens,
    a category or tag of your own side table), or None when the items have none."""
    from engine.data.attributes import NUMERIC
    from engine.index import bundle

    published = bundle.LoadedBundle(root, verify=False)
    attributes = published.layout.load_attributes(published.manifest)
    for name, attribute in attributes.attributes.items():
        if attribute.kind == NUMERIC or not attribute.vocabulary:
            continue
        if attribute.values.ndim == 2:  # labels: the label most items have
            value = attribute.vocabulary[int(np.argmax(attribute.values.sum(axis=0)))]
        else:  # a category: the most common one
            codes = attribute.values[attribute.values >= 0]
            value = attribute.vocabulary[int(np.argmax(np.bincount(codes)))]
        return f"{name} {value!r}", {name: [value]}
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http_recommend(http_port: int, user_id: str, k: int) -> dict:
    """``POST /v1/recommend`` on the server's HTTP face, as any HTTP client would."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/recommend",
        data=json.dumps({"user_id": user_id, "k": k}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle root (default: paths.bundles)")
    args = parser.parse_args(argv)
    root = Path(args.bundle or load_config()["paths"]["bundles"])
    known_user, popular_item = example_ids(root)
    new_user, new_user_request = example_new_user(root)
    item_filter = example_filter(root)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        started = time.perf_counter()
        try:
            http_port = _free_port()
            # The demo runs without auth.
            server, port = spawn_server(root, port_file, "--http-port", str(http_port), stderr=subprocess.PIPE)
        except ServeError as e:
            print(e, file=sys.stderr)
            return 1
        try:
            target = f"127.0.0.1:{port}"
            with Client(target) as client:
                client.wait_ready()
                info = client.info()
                print(
                    f"tandem serve is up on {target} ({time.perf_counter() - started:.1f} s): bundle "
                    f"{info['version']}, {int(info['n_items']):,} items, {int(info['n_users']):,} users, health "
                    f"{client.health()}"
                )
                for index in info["indexes"]:
                    print(
                        f"  index {index['name']}: {index['factory']} {index['search_params']} "
                        f"recall@{index['k']} {index['recall_at_k']:.3f}"
                    )
                recs = client.recommend(known_user, k=10)
                _print(f"Recommendations for user {known_user} (the most active user; seen items excluded):", recs)
                over_http = [item["item_id"] for item in _http_recommend(http_port, known_user, 10)["items"]]
                print(
                    f"  the same request as JSON over HTTP (POST http://127.0.0.1:{http_port}/v1/recommend): "
                    + ("the same 10 items" if over_http == recs.item_ids.tolist() else f"different items {over_http}")
                )
                _print(
                    f"Recommendations for {new_user}:",
                    client.recommend(**new_user_request, k=10),
                )
                if item_filter is not None:
                    described, filters = item_filter
                    _print(
                        f"Recommendations for user {known_user} among the items with {described} (filtered inside "
                        "retrieval):",
                        client.recommend(known_user, k=5, filters=filters),
                    )
                similar = client.similar_items(popular_item, k=10)
                title = client.score(None, [popular_item]).titles[0]
                _print(f"More like {title} (the most rated item), by squared distance:", similar, distance=True)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=30)
        print(f"\nserver stopped (exit code {code}) after SIGTERM")
    print(
        "\nTo look inside (a user's history and recommendations, more like this, a new user, the bundle, "
        "learning curves, item embeddings):\n  make web    then open http://127.0.0.1:8000/ in a browser"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
