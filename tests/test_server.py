"""The gRPC service through a real server on an ephemeral port and a real channel:
every rpc against the library, every error path, auth, TLS, health and reflection,
metrics, hot reload under concurrent requests, and graceful shutdown of `tandem serve`."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.index import bundle
from engine.service.client import Client
from engine.service.processes import spawn_server
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc
from engine.service.server import ServerConfig, TandemServer
from engine.serving.engine import Engine, EngineConfig
from index_builder import build_bundle

ENGINE_CONFIG = EngineConfig(segment_key="occupation")
SETTINGS = ("engine.segment_key=occupation",)  # the same, for a `tandem serve` process


@pytest.fixture(scope="module")
def world(small_models, tmp_path_factory):
    """The shared small models and a bundle root with two published versions (the
    second current)."""
    ds, cf, towers = small_models
    root = tmp_path_factory.mktemp("bundles")
    first = build_bundle(ds, cf, towers, root, log=lambda line: None)
    second = build_bundle(ds, cf, towers, root, log=lambda line: None)
    return ds, root, first.name, second.name


def start(root, **settings) -> TandemServer:
    return TandemServer(root, ServerConfig(port=0, **settings), ENGINE_CONFIG).start()


@pytest.fixture(scope="module")
def server(world):
    s = start(world[1], max_batch=50, metrics_port=0, watch_interval=0, max_message_bytes=64 * 1024)
    yield s
    s.stop(0)


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def same(a, b):
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    assert a.sources == b.sources and a.titles == b.titles and a.served_by == b.served_by


def test_every_rpc_equals_the_library(client, world):
    ds, root = world[0], world[1]
    library = Engine.load(root, ENGINE_CONFIG)
    genre = library.genre_labels[0]
    cases = [
        dict(user_id="u3"),
        dict(user_id="u5", k=4, n_candidates=50),
        dict(user_features={"age": 31, "occupation": ds.user_features.columns["occupation"][0]}),
        dict(ratings={"i1": 5, "i2": 4, "i9": 1}),
        dict(user_id="stranger"),
        dict(user_id="u7", filters={"genres": [genre]}, exclude_items=["i0"], sources=["cf", "towers"]),
        # Generic attribute filters (AttributeFilter): labels all-of, a numeric range.
        dict(user_id="u4", filters={"genres": {"all": library.genre_labels[:2]}, "year": {"gte": 1990, "lt": 2010}}),
        dict(user_id="u6", filters={"year": {"lte": 2000}, "genres": {"any": [genre]}}),
        dict(user_id="u8", include_items=["i1", "i2", "i3", "i4"], k=3, exclude_seen=False),
    ]
    for case in cases:
        same(client.recommend(**case), library.recommend(**case))
    for got, want in zip(
        client.recommend_batch(["u1", "u2", "nobody"], k=5), library.recommend_batch(["u1", "u2", "nobody"], k=5)
    ):
        same(got, want)
    same(client.similar_items("i4", k=6), library.similar_items("i4", k=6))
    same(client.score("u2", ["i1", "i2", "i3"]), library.score("u2", ["i1", "i2", "i3"]))
    assert client.echo(b"ping") == b"ping"
    info = client.info()
    assert info["version"] == library.version and int(info["n_items"]) == ds.n_items
    assert {i["name"] for i in info["indexes"]} == {"cf_l2", "cf_ip", "towers_ip"}
    assert all(i["recall_at_k"] >= 0.95 for i in info["indexes"])
    tabled = {i["name"]: i["user_top_k"] for i in info["indexes"]}
    assert tabled["cf_l2"] == 0 and tabled["cf_ip"] == 256


def test_add_items_is_served_at_once(world):
    s = start(world[1], watch_interval=0)
    try:
        with Client(f"127.0.0.1:{s.port}") as c:
            n = c.add_items(["fresh-1"], [{"year": 2024, "title": "Fresh"}])
            assert n == world[0].n_items + 1
            assert {i["name"]: i["user_top_k"] for i in c.info()["indexes"]}["towers_ip"] == 0  # retired
            recs = c.recommend("u1", include_items=["fresh-1"], k=1, sources=["towers"])
            assert list(recs.item_ids) == ["fresh-1"] and recs.titles == ["Fresh"]
            assert len(c.similar_items("fresh-1", k=3)) == 3
            with pytest.raises(grpc.RpcError) as e:
                c.add_items(["fresh-1"], [{}])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        s.stop(0)


@pytest.mark.parametrize(
    "call, code, words",
    [
        (lambda c: c.recommend("u1", k=-1), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        (lambda c: c.recommend("u1", k=10**6), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        (lambda c: c.recommend("u1", n_candidates=10**7), grpc.StatusCode.INVALID_ARGUMENT, "n_candidates"),
        (lambda c: c.recommend_batch([f"u{i}" for i in range(51)]), grpc.StatusCode.INVALID_ARGUMENT, "at most 50"),
        (lambda c: c.recommend(user_features={"age": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (lambda c: c.recommend(user_features={"age": float("inf")}), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (lambda c: c.recommend(ratings={"i1": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (lambda c: c.recommend(user_features={"shoe": 3}), grpc.StatusCode.INVALID_ARGUMENT, "unknown user feature"),
        (lambda c: c.recommend("u1", sources=["magic"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown source"),
        (lambda c: c.recommend("u1", filters={"genres": ["Opera"]}), grpc.StatusCode.INVALID_ARGUMENT, "unknown value"),
        (lambda c: c.recommend("u1", filters={"weight": {"lt": 3}}), grpc.StatusCode.INVALID_ARGUMENT, "attribute"),
        (lambda c: c.recommend("u1", filters={"year": ["old"]}), grpc.StatusCode.INVALID_ARGUMENT, "numeric"),
        (lambda c: c.recommend("u1", exclude_items=["i999999"]), grpc.StatusCode.NOT_FOUND, "i999999"),
        (lambda c: c.similar_items("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda c: c.score("u1", ["i1", "nope"]), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda c: c.score("u1", []), grpc.StatusCode.INVALID_ARGUMENT, "at least one"),
        (lambda c: c.add_items(["x"], [{"year": float("nan")}]), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (lambda c: c.echo(b"x" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "at most 65,536"),
        # k = 0 sent on purpose is refused, as the library does (an unset k means 10).
        (lambda c: c.recommend("u1", k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        (lambda c: c.recommend("u1", n_candidates=0), grpc.StatusCode.INVALID_ARGUMENT, "n_candidates"),
        (lambda c: c.similar_items("i4", k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        # Values out of range: flags that are not 0/1, numbers a float32 tower would overflow on.
        (lambda c: c.add_items(["x"], [{"genres": [300] + [0] * 5}]), grpc.StatusCode.INVALID_ARGUMENT, "flags"),
        (lambda c: c.add_items(["x"], [{"genres": [282501] * 6}]), grpc.StatusCode.INVALID_ARGUMENT, "flags"),
        (lambda c: c.recommend(user_features={"age": 1e39}), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (lambda c: c.score(user_features={"age": 1e39}, item_ids=["i1"]), grpc.StatusCode.INVALID_ARGUMENT, "range"),
        (lambda c: c.add_items(["x"], [{"year": 1e39}]), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (
            lambda c: c.recommend(user_features={"occupation": [1.0, 2.0]}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "one text value",
        ),
        # A known user's request features are checked too.
        (lambda c: c.recommend("u1", user_features={"age": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (lambda c: c.recommend("u1", user_features={"shoe": 1}), grpc.StatusCode.INVALID_ARGUMENT, "unknown user"),
        # Bounded strings: no id or title may multiply memory.
        (lambda c: c.add_items(["x" * 5000], [{}]), grpc.StatusCode.INVALID_ARGUMENT, "at most 256"),
        (lambda c: c.add_items(["x"], [{"title": "t" * 5000}]), grpc.StatusCode.INVALID_ARGUMENT, "at most 1,024"),
    ],
)
def test_bad_requests_get_clear_status_codes(client, call, code, words):
    with pytest.raises(grpc.RpcError) as e:
        call(client)
    assert e.value.code() == code and words in e.value.details(), (e.value.code(), e.value.details())


def test_errors_are_the_library_types_and_do_not_echo_huge_values(client):
    from engine.errors import InvalidRequest, UnknownIdError

    with pytest.raises(UnknownIdError) as e:  # also a grpc.RpcError, NOT_FOUND
        client.similar_items("n" * 60_000)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 1_100
    with pytest.raises(InvalidRequest):
        client.recommend("u1", k=0)


def test_undecodable_request_bytes_are_invalid_argument(server):
    """Bytes that are not a valid message, sent through a generic channel to every rpc."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                call = channel.unary_unary(f"/{service.full_name}/{method.name}")
                with pytest.raises(grpc.RpcError) as e:
                    call(b"\xff\xff\xff\xff", timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, e.value.details())
                assert "not a valid" in e.value.details()


def test_a_bug_inside_a_request_is_internal_not_the_clients_fault(server, client, monkeypatch):
    """A ValueError from inside NumPy is not a bad request: INTERNAL, logged."""

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(server.holder.engine, "recommend", broken)
    with pytest.raises(grpc.RpcError) as e:
        client.recommend("u1")
    assert e.value.code() == grpc.StatusCode.INTERNAL


def test_recommend_reply_carries_the_candidate_counts(client, world):
    library = Engine.load(world[1], ENGINE_CONFIG)
    assert client.recommend("u3").candidates == library.recommend("u3").candidates != {}
    assert client.recommend_batch(["u3"])[0].candidates == library.recommend("u3").candidates


def test_batch_over_the_results_limit_is_refused_up_front(world):
    s = start(world[1], watch_interval=0, max_batch_results=100)
    try:
        with Client(f"127.0.0.1:{s.port}") as c:
            with pytest.raises(grpc.RpcError) as e:
                c.recommend_batch(["u1", "u2", "u3"], k=50)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_results" in e.value.details()
            assert len(c.recommend_batch(["u1", "u2"], k=50)) == 2
    finally:
        s.stop(0)


def test_add_items_needs_the_token(world, tmp_path):
    """AddItems changes what every user sees: an admin write, guarded like Reload."""
    root = tmp_path / "root"
    shutil.copytree(world[1], root, symlinks=True)
    s = start(root, token="s3cret", watch_interval=0)
    try:
        target = f"127.0.0.1:{s.port}"
        with Client(target) as anonymous, Client(target, token="s3cret") as ok:
            with pytest.raises(grpc.RpcError) as e:
                anonymous.add_items(["sneaky"], [{}])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            before = int(ok.info()["n_items"])
            assert ok.add_items(["allowed"], [{}]) == before + 1
    finally:
        s.stop(0)


def test_unknown_user_is_served_by_cold_start(client):
    recs = client.recommend("somebody-new", k=5)
    assert len(recs) == 5 and all(s == ("popular",) for s in recs.sources)


def test_a_long_batch_does_not_hold_up_one_users_request(client, server, monkeypatch):
    """RecommendBatch runs on the server's threads, one user's Recommend inline on its
    event loop: while a batch takes a second, a Recommend is still answered at once.
    (Were the batch run on the loop too, the Recommend would wait for it.)"""
    from engine.serving.engine import Engine as EngineClass

    batch = EngineClass.recommend_batch
    started = threading.Event()

    def slow_batch(self, *args, **kwargs):
        started.set()
        time.sleep(1.0)  # (sleeping releases the GIL, as NumPy and FAISS do)
        return batch(self, *args, **kwargs)

    monkeypatch.setattr(EngineClass, "recommend_batch", slow_batch)
    done = []
    worker = threading.Thread(target=lambda: done.append(client.recommend_batch(["u1", "u2"], k=3)))
    worker.start()
    try:
        assert started.wait(10)
        start = time.perf_counter()
        recs = client.recommend("u3", k=5)
        waited = time.perf_counter() - start
    finally:
        worker.join(30)
    assert len(recs) == 5 and waited < 0.5, waited
    assert len(done) == 1 and len(done[0]) == 2  # the batch completed too


def test_the_server_stops_a_batch_at_its_deadline(client, server, monkeypatch):
    """The server itself gives up on a batch whose deadline passed (not only the client):
    it serves no chunk after the deadline and records DEADLINE_EXCEEDED. Without the
    server's deadline handling it would serve all 50 chunks and record OK."""
    from engine.serving.engine import Engine as EngineClass

    monkeypatch.setattr("engine.serving.engine.BATCH_CHUNK", 1)  # one user per chunk
    served = []
    serve = EngineClass._serve

    def slow_serve(self, *args, **kwargs):
        served.append(1)
        time.sleep(0.02)
        return serve(self, *args, **kwargs)

    monkeypatch.setattr(EngineClass, "_serve", slow_serve)
    registry = server.metrics.registry
    labels = {"rpc": "RecommendBatch", "code": "DEADLINE_EXCEEDED"}
    before = registry.get_sample_value("tandem_requests_total", labels) or 0
    with pytest.raises(grpc.RpcError) as e:
        client.recommend_batch([f"u{i}" for i in range(50)], timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 5
    while (registry.get_sample_value("tandem_requests_total", labels) or 0) == before and time.time() < deadline:
        time.sleep(0.05)  # the server answers after the client gave up
    assert (registry.get_sample_value("tandem_requests_total", labels) or 0) == before + 1
    assert len(served) < 25


def test_health_reflection_and_metrics(client, server):
    assert client.health() == "SERVING"
    assert client.health("tandem.v1.Recommender") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tandem.v1.Recommender", "tandem.v1.Admin", "grpc.health.v1.Health"} <= services
    client.recommend("u1")
    with pytest.raises(grpc.RpcError):
        client.similar_items("nope")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'tandem_requests_total{code="OK",rpc="Recommend"}' in text
    assert 'tandem_requests_total{code="NOT_FOUND",rpc="SimilarItems"}' in text
    assert 'tandem_request_seconds_bucket{le="0.005",rpc="Recommend"}' in text
    assert 'tandem_candidates_count{source="cf"}' in text


def test_light_histogram_matches_prometheus_client():
    """The server's own histogram (one lock per request) exports what prometheus_client's
    Histogram exports for the same observations: the reference."""
    from prometheus_client import CollectorRegistry, Histogram

    from engine.service.metrics import LightHistogram

    buckets = (0, 10, 25, 50, 100, 200, 500)
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = LightHistogram("h", "test", "source", buckets, ours_registry)
    reference = Histogram("h", "test", ["source"], buckets=buckets, registry=reference_registry)
    values = [("cf", 175), ("cf", 0), ("towers", 10), ("cf", 10.5), ("towers", 501), ("cf", 200), ("recent", 25)]
    ours.observe(values)
    for label, value in values:
        reference.labels(label).observe(value)

    def samples(registry):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        )

    assert samples(ours_registry) == samples(reference_registry)


def test_bearer_token_guards_admin_or_everything(world):
    s = start(world[1], token="s3cret", watch_interval=0)
    strict = start(world[1], token="s3cret", token_all=True, watch_interval=0)
    try:
        target = f"127.0.0.1:{s.port}"
        with Client(target) as anonymous, Client(target, token="wrong") as wrong, Client(target, token="s3cret") as ok:
            assert len(anonymous.recommend("u1", k=3)) == 3  # the token guards Admin only
            for c in (anonymous, wrong):
                with pytest.raises(grpc.RpcError) as e:
                    c.info()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ok.info()["version"] == world[3]
        with Client(f"127.0.0.1:{strict.port}") as anonymous, Client(f"127.0.0.1:{strict.port}", token="s3cret") as ok:
            with pytest.raises(grpc.RpcError) as e:
                anonymous.recommend("u1")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(ok.recommend("u1", k=2)) == 2
            assert anonymous.health() == "SERVING"  # health stays open to load balancers
    finally:
        s.stop(0)
        strict.stop(0)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(world, tmp_path):
    cert, key = self_signed(tmp_path)
    s = start(world[1], tls_cert=str(cert), tls_key=str(key), token="t0ken", watch_interval=0)
    try:
        with Client(f"localhost:{s.port}", root_certificates=cert, token="t0ken") as c:
            assert len(c.recommend("u1", k=4)) == 4
            assert c.info()["version"] == world[3]
        with Client(f"localhost:{s.port}", timeout=2) as plaintext:  # no TLS: refused
            with pytest.raises(grpc.RpcError) as e:
                plaintext.recommend("u1")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop(0)
    with pytest.raises(ValueError, match="both a certificate"):
        TandemServer(world[1], ServerConfig(port=0, tls_cert=str(cert)))


def test_hot_reload_under_concurrent_requests(world, tmp_path):
    """>= 10 swaps of `current` (by Reload and by the watcher) while 4 threads send
    requests: no request fails, both versions serve, a broken bundle is refused."""
    root = tmp_path / "root"
    shutil.copytree(world[1], root, symlinks=True)
    first, second = world[2], world[3]
    s = start(root, watch_interval=0.05)
    failures, versions, stop = [], set(), threading.Event()

    def load():
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            n = 0
            while not stop.is_set():
                try:
                    reply = stub.Recommend(pb.RecommendRequest(user_id=f"u{n % 50}", k=5), timeout=10)
                    assert len(reply.items) == 5
                    versions.add(reply.version)
                except Exception as e:  # noqa: BLE001 - counted, reported below
                    failures.append(repr(e))
                n += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with Client(f"127.0.0.1:{s.port}") as admin:
            swaps = 0
            for round_ in range(12):
                target = first if round_ % 2 == 0 else second
                bundle.set_current(root, target)
                if round_ % 3 == 0:  # let the watcher notice this one
                    deadline = time.time() + 10
                    while s.holder.engine.version != target and time.time() < deadline:
                        time.sleep(0.02)
                else:
                    assert admin.reload()["version"] == target
                assert s.holder.engine.version == target
                swaps += 1
                time.sleep(0.05)
            # A corrupted bundle: the reload fails, the old version keeps serving.
            broken = root / bundle.VERSIONS / "broken"
            shutil.copytree(root / bundle.VERSIONS / first, broken)
            (broken / "tables" / "popularity.npy").write_bytes(b"garbage")
            serving = s.holder.engine.version
            bundle.set_current(root, "broken")
            reply = admin.reload()
            assert not reply["reloaded"] and reply["version"] == serving and "popularity.npy" in reply["message"]
            time.sleep(0.3)  # the watcher must not replace it either
            assert s.holder.engine.version == serving
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.stop(0)
    assert swaps >= 10 and failures == [] and versions == {first, second}


def test_sigterm_delivered_to_a_worker_thread_still_stops_the_server(world, tmp_path):
    """The kernel may deliver a process-directed signal to any thread: one sent to a
    gRPC thread (not the main one) must still shut the server down."""
    import ctypes

    proc, port = spawn_server(world[1], tmp_path / "port", settings=SETTINGS, stderr=subprocess.PIPE)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            assert c.echo(b"up") == b"up"
        worker = next(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert ctypes.CDLL(None, use_errno=True).tgkill(proc.pid, worker, signal.SIGTERM) == 0
        assert proc.wait(timeout=30) == 0
        assert '"event": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tandem_serve_shuts_down_gracefully_on_sigterm(world, tmp_path):
    proc, port = spawn_server(world[1], tmp_path / "port", settings=SETTINGS, token="tok", stderr=subprocess.PIPE)
    try:
        with Client(f"127.0.0.1:{port}", token="tok", timeout=60) as c:
            assert c.echo(b"up") == b"up"  # the channel is connected
            for i in range(300):  # requests served inline on the event loop, as in production
                assert len(c.recommend(f"u{i}", k=5)) == 5
            users = [f"u{i % 400}" for i in range(1000)]
            stub = pb_grpc.RecommenderStub(c._channel)
            # A deliberately long request (every item a candidate, for 1000 users: seconds).
            request = pb.RecommendBatchRequest(user_ids=users, options=pb.RecommendRequest(n_candidates=5000, k=100))
            future = stub.RecommendBatch.future(request, timeout=60)
            time.sleep(0.3)  # the request is in flight
            assert not future.done(), "the request finished before the signal: make it longer"
            proc.send_signal(signal.SIGTERM)
            reply = future.result()  # finishes despite the signal
            assert len(reply.results) == 1000
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert '"event": "signal"' in log and '"event": "stopped"' in log
        # No traceback on the way out (gRPC's shutdown once closed its poller's socket under
        # the still-running loop: "Bad file descriptor", intermittently, after long loads).
        assert "Traceback" not in log and "Bad file descriptor" not in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tandem_serve_runs_several_processes_on_one_port(world, tmp_path):
    """Two processes share the port (and no other server may join it); an item added
    through one process is served by both within the watch interval (1 s)."""
    root = tmp_path / "root"
    shutil.copytree(world[1], root, symlinks=True)
    proc, port = spawn_server(root, tmp_path / "port", "--processes", "2", settings=SETTINGS, stderr=subprocess.PIPE)
    try:
        versions = set()
        target = f"127.0.0.1:{port}"
        for _ in range(12):  # new connections: the kernel spreads them over both processes
            with Client(target, timeout=30) as c:
                assert len(c.recommend("u3", k=5)) == 5
                versions.add(c.info()["version"])
        with Client(target, timeout=30) as c:
            c.add_items(["multi-1"], [{"year": 2024}])
        time.sleep(2.5)  # the watch interval (1 s), with room to spare on a busy machine
        for _ in range(12):
            with Client(target, timeout=30) as c:
                assert len(c.similar_items("multi-1", k=2)) == 2  # NOT_FOUND on a process that missed it
        lone = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "serve",
                "--bundle",
                str(root),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert lone.returncode == 2 and "cannot serve on" in lone.stderr  # refused, not silently shared
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
        assert "with 2 processes" in log and log.count(f"on 127.0.0.1:{port}") == 3  # two servers, one summary
        assert log.count('"event": "stopped"') == 2 and len(versions) == 1  # both stopped gracefully
    finally:
        if proc.poll() is None:
            proc.kill()


def test_several_processes_stop_together_when_one_cannot_start(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--processes",
            "2",
            "--bundle",
            str(tmp_path / "nothing-here"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "neither a bundle" in done.stderr and "a server process exited; stopping" in done.stderr


# A stand-in server that reports ready and then ignores SIGTERM: a shutdown that never ends.
_STUCK_SERVER = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[sys.argv.index("--port-file") + 1], "w").write("ready")
time.sleep(120)  # an orphan (if the test fails) ends on its own
"""


def test_process_group_kills_a_process_whose_shutdown_hangs(tmp_path):
    """The supervisor of `tandem serve --processes` gives each process stop_timeout
    seconds after SIGTERM, then kills it: a stuck shutdown cannot keep the group alive."""
    port_file = tmp_path / "port"
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from engine.service.processes import serve_processes; sys.exit(serve_processes("
            f"1, [sys.executable, '-c', {_STUCK_SERVER!r}], '127.0.0.1', 0, None, {str(port_file)!r}, "
            "stop_timeout=1.0))",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not port_file.exists():
            assert supervisor.poll() is None and time.time() < deadline, "the group did not start"
            time.sleep(0.05)
        started = time.time()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 1
        assert time.time() - started < 20
        assert "did not stop in time; killing it" in supervisor.stderr.read()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def test_items_added_during_a_reload_are_served_after_it(world, tmp_path, monkeypatch):
    """An add acknowledged while a reload loads the next version is in that version too:
    the holder never swaps in an engine that missed it."""
    from engine.service.holder import EngineHolder

    root = tmp_path / "root"
    shutil.copytree(world[1], root, symlinks=True)
    holder = EngineHolder(root, ENGINE_CONFIG)
    bundle.set_current(root, world[2])  # the other version: the reload loads it
    load = Engine.load.__func__
    loading = threading.Event()

    def slow_load(cls, *args, **kwargs):
        loading.set()
        time.sleep(0.5)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Engine, "load", classmethod(slow_load))
    reloading = threading.Thread(target=holder.reload)
    reloading.start()
    assert loading.wait(10)
    holder.add_items(["during-reload"], [{"year": 2024}])
    reloading.join()
    assert holder.engine.version == world[2] and "during-reload" in holder.engine.items
