"""The HTTP/JSON face through a real uvicorn server on an ephemeral port, beside the gRPC
server on the same engine: every route against the library, the errors (400/401/404/413
with JSON bodies), the token, the limits, writes seen by both faces, the OpenAPI
document and the web page's data; and `tandem serve --http-port` as a process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.service.client import Client
from engine.service.server import ServerConfig, TandemServer
from engine.serving.engine import Engine, EngineConfig
from index_builder import build_bundle

ENGINE_CONFIG = EngineConfig(segment_key="occupation")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def world(titled_models, tmp_path_factory):
    ds, cf, towers = titled_models
    root = tmp_path_factory.mktemp("http-bundles")
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    return ds, root


def start(root, **settings) -> TandemServer:
    settings = {"port": 0, "http_port": 0, "watch_interval": 0, "eval_report": "", **settings}
    return TandemServer(root, ServerConfig(**settings), ENGINE_CONFIG).start()


@pytest.fixture(scope="module")
def server(world):
    s = start(world[1], max_batch=50, max_message_bytes=64 * 1024, metrics_port=0)
    yield s
    s.stop(0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.http.url, timeout=30) as c:
        yield c


def items_of(reply: dict) -> tuple[list, np.ndarray]:
    return [i["item_id"] for i in reply["items"]], np.array([i["score"] for i in reply["items"]])


def same(reply: dict, recs) -> None:
    ids, scores = items_of(reply)
    assert ids == recs.item_ids.tolist()
    np.testing.assert_allclose(scores, recs.scores, rtol=1e-6)
    assert [tuple(i["sources"]) for i in reply["items"]] == recs.sources
    assert [i["title"] for i in reply["items"]] == recs.titles
    assert reply["served_by"] == recs.served_by and reply["metric"] == recs.metric


def test_every_route_equals_the_library(http, world):
    ds, root = world
    library = Engine.load(root, ENGINE_CONFIG)
    genre = library.genre_labels[0]
    occupation = str(ds.user_features.columns["occupation"][0])
    cases = [
        dict(user_id="u3"),
        dict(user_id="u5", k=4, n_candidates=50),
        dict(user_features={"age": 31, "occupation": occupation}),
        dict(ratings={"i1": 5, "i2": 4, "i9": 1}),
        dict(user_id="stranger"),
        dict(user_id="u7", filters={"genres": [genre]}, exclude_items=["i0"], sources=["cf", "towers"]),
        dict(user_id="u8", filters={"year": {"gte": 1990}}, include_items=[f"i{j}" for j in range(40)], k=5),
    ]
    for case in cases:
        reply = http.post("/v1/recommend", json=case)
        assert reply.status_code == 200, reply.text
        same(reply.json(), library.recommend(**case))
    # include_seen is the library's exclude_seen=False
    same(http.post("/v1/recommend", json={"user_id": "u3", "include_seen": True}).json(),
         library.recommend("u3", exclude_seen=False))  # fmt: skip
    batch = http.post("/v1/recommend/batch", json={"user_ids": ["u1", "u2", "nobody"], "options": {"k": 3}}).json()
    for reply, recs in zip(batch["results"], library.recommend_batch(["u1", "u2", "nobody"], k=3)):
        same(reply, recs)
    same(http.get("/v1/similar", params={"item_id": "i4", "k": 5}).json(), library.similar_items("i4", k=5))
    scored = http.post("/v1/score", json={"user_id": "u3", "item_ids": ["i1", "i2", "i3"]}).json()
    same(scored, library.score("u3", ["i1", "i2", "i3"]))
    assert scored["items"][0]["title"].startswith("Film number")


@pytest.mark.parametrize(
    "method, path, body, status, words",
    [
        ("post", "/v1/recommend", {"user_id": "u1", "k": 0}, 400, "k must be"),
        ("post", "/v1/recommend", {"user_id": "u1", "kk": 3}, 400, "kk: Extra inputs"),
        ("post", "/v1/recommend", {"user_id": "u1", "k": "ten"}, 400, "k: Input should be a valid integer"),
        ("post", "/v1/recommend", {"ratings": {"no-such-item": 4}}, 404, "no-such-item"),
        ("post", "/v1/recommend", {"user_id": "u1", "filters": {"colour": ["red"]}}, 400, "colour"),
        ("post", "/v1/recommend", {"user_id": "u1", "sources": ["oracle"]}, 400, "oracle"),
        ("post", "/v1/recommend/batch", {"user_ids": [f"u{j}" for j in range(51)]}, 400, "at most 50"),
        ("post", "/v1/score", {"user_id": "u1", "item_ids": []}, 400, "at least one item"),
        ("get", "/v1/similar?item_id=nope", None, 404, "nope"),
        ("get", "/v1/similar?item_id=i1&k=100000", None, 400, "k must be"),
        ("get", "/v1/history?user_id=nobody", None, 404, "nobody"),
        ("get", "/v1/plots/projection?model=svd", None, 400, "model must be"),
        ("get", "/v1/no/such/route", None, 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_errors_that_name_the_problem(http, method, path, body, status, words):
    reply = http.request(method.upper(), path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["status"] == status and words in error["message"]
    assert error["code"] == {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[status]


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(http):
    big = {"user_id": "u1", "exclude_items": ["i1" * 10] * 5000}  # over max_message_bytes = 64 KiB
    reply = http.post("/v1/recommend", json=big)
    assert reply.status_code == 413 and "at most 65,536" in reply.json()["error"]["message"]
    # without a Content-Length (chunked): counted while it is read
    chunks = (json.dumps(big)[j : j + 4096].encode() for j in range(0, len(json.dumps(big)), 4096))
    reply = http.post("/v1/recommend", content=chunks, headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert http.post("/v1/recommend", json={"user_id": "u1"}).status_code == 200  # the server is fine


def test_a_bug_is_a_500_with_a_json_body_and_no_details(http, server, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("secret internals")

    monkeypatch.setattr(server.holder.engine, "similar_items", broken)
    reply = http.get("/v1/similar", params={"item_id": "i1"})
    assert reply.status_code == 500
    assert reply.json()["error"] == {"status": 500, "code": "INTERNAL", "message": "internal error: ValueError"}


def test_the_token_guards_writes_and_admin_and_everything_with_token_all(world):
    root = world[1]
    s = start(root, token=TOKEN)
    try:
        with httpx.Client(base_url=s.http.url) as c:
            for method, path, body in [
                ("POST", "/v1/items", {"items": [{"item_id": "new", "features": {"year": 2000}}]}),
                ("POST", "/v1/feedback", {"events": [{"user_id": "u1", "item_id": "i1", "kind": "click"}]}),
                ("GET", "/v1/info", None),
                ("POST", "/v1/reload", None),
            ]:
                refused = c.request(method, path, json=body)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
                wrong = c.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
            assert c.get("/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert c.post("/v1/recommend", json={"user_id": "u1"}).status_code == 200  # reads stay open
            assert c.get("/healthz").json()["status"] == "SERVING"
    finally:
        s.stop(0)
    s = start(root, token=TOKEN, token_all=True)
    try:
        with httpx.Client(base_url=s.http.url) as c:
            assert c.post("/v1/recommend", json={"user_id": "u1"}).status_code == 401
            assert c.get("/v1/schema").status_code == 401
            ok = c.post("/v1/recommend", json={"user_id": "u1"}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
            assert c.get("/healthz").status_code == 200  # load balancers probe without a token
            assert c.get("/").status_code == 200  # the page loads, and asks for the token
    finally:
        s.stop(0)


def test_writes_over_http_are_served_by_both_faces(titled_models, tmp_path):
    ds, cf, towers = titled_models
    build_bundle(ds, cf, towers, tmp_path, log=lambda line: None)
    s = start(tmp_path, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=s.http.url, headers=auth) as c, Client(f"127.0.0.1:{s.port}", token=TOKEN) as g:
            added = c.post(
                "/v1/items", json={"items": [{"item_id": "fresh", "title": "Fresh", "features": {"year": 2024}}]}
            )
            assert added.status_code == 200 and added.json()["n_items"] == ds.n_items + 1
            assert g.similar_items("fresh", k=3).item_ids.size == 3  # gRPC serves the item HTTP added
            # a bad batch records nothing
            bad = {
                "events": [
                    {"user_id": "u1", "item_id": "i1", "kind": "click"},
                    {"user_id": "u1", "item_id": "zz", "kind": "click"},
                ]
            }
            assert c.post("/v1/feedback", json=bad).status_code == 404
            assert (
                c.post(
                    "/v1/feedback", json={"events": [{"user_id": "u1", "item_id": "i1", "kind": "smell"}]}
                ).status_code
                == 400
            )
            before = c.get("/v1/history", params={"user_id": "newcomer"})
            assert before.status_code == 404
            events = [
                {"user_id": "newcomer", "item_id": "i5", "kind": "rating", "value": 5, "timestamp": 1.0},
                {"user_id": "newcomer", "item_id": "i6", "kind": "click"},
            ]
            recorded = c.post("/v1/feedback", json={"events": events}).json()
            assert recorded["recorded"] == 2 and recorded["new_users"] == 1
            history = c.get("/v1/history", params={"user_id": "newcomer"}).json()
            assert {i["item_id"] for i in history["items"]} == {"i5", "i6"} and history["in_bundle"] is False
            assert history["items"][0] == {"item_id": "i5", "title": "Film number 5", "value": 5.0}
            reply = c.post("/v1/recommend", json={"user_id": "newcomer"}).json()
            assert reply["served_by"] == "live events"
            assert not {"i5", "i6"} & set(items_of(reply)[0])
            assert g.recommend(user_id="newcomer").item_ids.tolist() == items_of(reply)[0]
            info = c.get("/v1/info").json()
            assert info["feedback_events"] == 2 and info["n_items"] == ds.n_items + 1
    finally:
        s.stop(0)


def test_openapi_documents_every_route(http):
    document = http.get("/openapi.json").json()
    paths = document["paths"]
    for path in ["/v1/recommend", "/v1/recommend/batch", "/v1/similar", "/v1/score", "/v1/items", "/v1/feedback",
                 "/v1/info", "/v1/reload", "/healthz", "/v1/history", "/v1/plots/projection"]:  # fmt: skip
        assert path in paths, path
    body = document["components"]["schemas"]["RecommendBody"]["properties"]
    assert {"user_id", "user_features", "ratings", "k", "filters", "sources", "explain"} <= set(body)


def test_the_page_data(http, world, server, tmp_path):
    ds = world[0]
    schema = http.get("/v1/schema").json()
    assert [f["name"] for f in schema["user_features"]] == ["age", "gender", "occupation", "zip_code"]
    assert schema["user_features"][2]["kind"] == "choice" and schema["n_items"] == ds.n_items
    curves = http.get("/v1/plots/curves").json()
    assert set(curves) >= {"cf", "towers"}  # the models recorded theirs while training
    assert len(curves["towers"]) == 3 and "train_loss" in curves["towers"][0]  # 3 epochs
    projection = http.get("/v1/plots/projection", params={"model": "cf", "max_items": 100}).json()
    assert len(projection["points"]) == 100 and projection["colour_by"] == "genres"
    assert {p["label"] for p in projection["points"]} <= set(projection["labels"]) | {""}
    # PCA: the first axis explains at least as much as the second, and they are uncorrelated
    xy = np.array([[p["x"], p["y"]] for p in projection["points"]])
    assert projection["explained_variance"][0] >= projection["explained_variance"][1] > 0
    assert abs(np.corrcoef(xy.T)[0, 1]) < 1e-6
    found = http.get("/v1/items/search", params={"query": "number 12"}).json()
    assert {"item_id": "i12", "title": "Film number 12"} in found
    assert all("number 12" in f["title"] for f in found)
    history = http.get("/v1/history", params={"user_id": "u3", "limit": 5}).json()
    values = [i["value"] for i in history["items"]]
    assert history["in_bundle"] and len(values) == 5 and values == sorted(values, reverse=True)
    assert history["n_items"] == int((ds.user_idx == ds.users.index("u3")).sum())
    assert http.get("/v1/plots/evaluation").json() == {"present": False}
    models = http.get("/v1/models").json()
    assert models["cf"]["config"]["n_features"] == 16 and "learning_curve" not in models["cf"]["metrics"]
    page = http.get("/")
    assert page.status_code == 200 and "<title>Tandem</title>" in page.text
    assert http.get("/static/app.js").status_code == 200


def test_the_evaluation_report_when_there_is_one(world, tmp_path):
    report = {
        "data": "synthetic", "splits": ["random"], "k": 10, "n_candidates": 500,
        "summary": {
            "pipeline": {"recall@10": 0.3, "ndcg@10": 0.2, "candidate_recall": {"cf": 0.7, "merged": 0.9}},
            "ease": {"recall@10": 0.25, "ndcg@10": 0.18},
            "implicit_als": {"skipped": "not installed"},
        },
    }  # fmt: skip
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(report))
    s = start(world[1], eval_report=str(path))
    try:
        found = httpx.get(f"{s.http.url}v1/plots/evaluation").json()
        assert found["present"] and found["candidate_recall"] == {"cf": 0.7, "merged": 0.9}
        assert found["systems"] == {"pipeline": {"recall": 0.3, "ndcg": 0.2}, "ease": {"recall": 0.25, "ndcg": 0.18}}
    finally:
        s.stop(0)


def test_requests_are_counted_in_the_metrics(http, server):
    http.post("/v1/recommend", json={"user_id": "u1"})
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert 'tandem_requests_total{code="200",rpc="http_recommend"}' in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tandem_serve_http_port(world, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "--set", "engine.segment_key=occupation", "serve", "--bundle",
         str(world[1]), "--port", "0", "--http-port", str(port), "--port-file", str(tmp_path / "port")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"user_id": "u1", "k": 3})
        assert reply.status_code == 200 and len(reply.json()["items"]) == 3
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    said = process.stderr.read()
    assert f"web page at http://127.0.0.1:{port}/" in said


def test_a_port_in_use_is_a_clear_error(world):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot serve HTTP on 127.0.0.1"):
            start(world[1], http_port=taken.getsockname()[1])


def test_the_web_assets_are_packaged():
    from engine.service import http

    assert {p.name for p in Path(http.WEB).iterdir()} >= {"index.html", "app.js", "charts.js", "style.css"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["user_id", "user_features", "ratings", "k", "n_candidates", "include_seen", "exclude_items", "include_items",
          "filters", "sources", "explain", "item_ids", "user_ids", "options", "events", "items"]  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    route=st.sampled_from(["/v1/recommend", "/v1/recommend/batch", "/v1/score"]),
    body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5) | JSON_VALUES,
)
def test_hostile_json_bodies_are_client_errors_never_a_500(http, route, body):
    """Random JSON of any shape (NaN and huge numbers included: Python's json writes them)
    on every body route: 200, or 400/404 with a JSON error; never 500 nor a hang."""
    reply = http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert reply.status_code in (200, 400, 404), (reply.status_code, reply.text)
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]


def test_a_group_of_processes_shares_the_http_port(world, tmp_path):
    """`tandem serve --processes 2 --http-port P`: both processes serve HTTP on P (SO_REUSEPORT, as
    the gRPC port), and a group refuses --http-port 0 (a port per process) with a clear error."""
    port = free_port()
    command = [sys.executable, "-m", "engine.cli", "--set", "engine.segment_key=occupation", "serve", "--bundle"]
    command += [str(world[1]), "--port", "0", "--processes", "2"]
    refused = subprocess.run([*command, "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "give a fixed HTTP port" in refused.stderr
    process = subprocess.Popen(
        [*command, "--http-port", str(port), "--port-file", str(tmp_path / "port")], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "port").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        versions = set()
        for _ in range(20):  # new connections: the kernel spreads them over the processes
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                reply = c.post("/v1/recommend", json={"user_id": "u1", "k": 3})
                assert reply.status_code == 200 and len(reply.json()["items"]) == 3
                versions.add(reply.json()["version"])
        assert len(versions) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
