"""A hostile client and a busy operator against a real `tandem serve` process.

- **Fuzzing** (hypothesis, seeded): every rpc with random ids, sizes, NaN/inf, huge
  numbers, unknown names, big batches, and raw bytes through a generic channel. The
  server must answer only OK, INVALID_ARGUMENT or NOT_FOUND (never INTERNAL, UNKNOWN or
  a transport error), and every OK reply must keep the contract: at most k items, no
  duplicates, finite scores, no excluded or seen item, filters respected.
- **Concurrency**: Recommend, RecommendBatch, SimilarItems and Score on several threads
  while one thread adds items and another reloads: no error, and the process survives.

The server runs in its own process, so that a crash (a segfault in compiled code) is a
failed test, not a dead test run.
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.index import bundle
from engine.service.processes import spawn_server
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc
from engine.serving.engine import Engine, EngineConfig
from index_builder import build_bundle

OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
# Examples per fuzzed rpc; TANDEM_FUZZ_EXAMPLES=2000 for a deeper run.
FUZZ = settings(
    max_examples=int(os.environ.get("TANDEM_FUZZ_EXAMPLES", 150)),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def served(small_models, tmp_path_factory):
    """A `tandem serve` process on a bundle root of its own (two versions of the same
    models, to reload between), the library engine on the same bundle (the reference
    for the contract), and a status tally."""
    ds, cf, towers = small_models
    root = tmp_path_factory.mktemp("hardening") / "root"
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    proc, port = spawn_server(
        root,
        root.parent / "port",
        "--log-level",
        "WARNING",
        settings=("engine.segment_key=occupation", "server.watch_interval=0.2"),
        stderr=subprocess.PIPE,
    )
    library = Engine.load(root, EngineConfig(segment_key="occupation"))
    tally: collections.Counter = collections.Counter()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 * 2**20)])
    yield proc, channel, library, root, tally
    channel.close()
    proc.terminate()
    code = proc.wait(timeout=60)
    print(f"\nhardening: {sum(tally.values())} requests, statuses {dict(tally)}")
    assert code == 0, proc.stderr.read()


# ------------------------------------------------------------------ strategies
def ids(prefix: str, n: int):
    """Known ids (prefix0 .. prefix{n-1}) and arbitrary text, long and odd included."""
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: f"{prefix}{i}"), st.text(max_size=40), st.text(min_size=200, max_size=3000)
    )


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6).map(float),
    st.sampled_from([1e39, -1e39, 1e300, 0.0, 1.0]),
)
FEATURE_NAMES = st.sampled_from(["age", "occupation", "zip_code", "gender", "genres", "year", "shoe", ""])


def feature_values():
    return st.one_of(
        NUMBERS.map(lambda x: pb.FeatureValue(number=x)),
        st.text(max_size=30).map(lambda t: pb.FeatureValue(text=t)),
        st.lists(NUMBERS, max_size=25).map(lambda v: pb.FeatureValue(numbers=pb.NumberList(values=v))),
        st.just(pb.FeatureValue()),
    )


FEATURES = st.dictionaries(FEATURE_NAMES, feature_values(), max_size=4)


def set_features(message_map, features: dict) -> None:
    for name, value in features.items():
        message_map[name].CopyFrom(value)


SIZES = st.one_of(
    st.none(), st.integers(-3, 40), st.integers(-(2**31), 2**31 - 1), st.sampled_from([1000, 1001, 5000, 5001])
)


@st.composite
def attribute_filters(draw):
    """AttributeFilter messages, valid or not: known and unknown attributes, label and
    numeric conditions mixed, bounds anywhere (NaN and infinities included)."""
    f = pb.AttributeFilter(attribute=draw(st.sampled_from(["genres", "year", "colour", ""])))
    labels = st.lists(st.one_of(st.sampled_from([f"genre {g}" for g in range(6)]), st.text(max_size=6)), max_size=2)
    f.any_of.extend(draw(labels))
    f.all_of.extend(draw(labels))
    for op in ("lt", "lte", "gt", "gte"):
        bound = draw(st.one_of(st.none(), st.none(), NUMBERS))
        if bound is not None:
            setattr(f, op, bound)
    return f


@st.composite
def recommend_requests(draw, with_user: bool = True):
    request = pb.RecommendRequest()
    if with_user:
        request.user_id = draw(st.one_of(st.just(""), ids("u", 400)))
        set_features(request.user_features, draw(FEATURES))
        request.ratings.update(draw(st.dictionaries(ids("i", 300), NUMBERS, max_size=4)))
    for name in ("k", "n_candidates"):
        value = draw(SIZES)
        if value is not None:
            setattr(request, name, value)
    request.include_seen = draw(st.booleans())
    request.exclude_items.extend(draw(st.lists(ids("i", 300), max_size=5)))
    request.include_items.extend(draw(st.lists(st.integers(0, 299).map(lambda i: f"i{i}"), max_size=30)))
    request.genres.extend(
        draw(st.lists(st.one_of(st.sampled_from([f"genre {g}" for g in range(6)]), st.text(max_size=10)), max_size=3))
    )
    request.sources.extend(
        draw(st.lists(st.sampled_from(["cf", "towers", "popular", "segment", "recent", "x"]), max_size=3))
    )
    request.filters.extend(draw(st.lists(attribute_filters(), max_size=2)))
    return request


# ------------------------------------------------------------------ contract
def check_items(
    reply_items, k: int, library: Engine, request: pb.RecommendRequest | None = None, user_id: str = ""
) -> None:
    """The contract of an OK reply's items."""
    items = [i.item_id for i in reply_items]
    assert len(items) <= k
    assert len(set(items)) == len(items), "duplicate items"
    assert all(math.isfinite(i.score) for i in reply_items), "non-finite score"
    if request is None:
        return
    assert not set(items) & set(request.exclude_items), "an excluded item"
    if request.include_items:
        assert set(items) <= set(request.include_items), "an item outside the allow-list"
    known = [i for i in items if i in library.items]  # items the fuzzing added are not in the reference
    if request.genres:
        cols = [library.genre_labels.index(g) for g in request.genres]
        assert library.genres[library.items.indices(known)][:, cols].any(axis=1).all(), "a filtered-out genre"
    for f in request.filters:  # an OK reply honours every attribute filter
        if f.attribute == "year" and known:
            years = library.attributes["year"].values[library.items.indices(known)]
            for op, holds in (("lt", np.less), ("lte", np.less_equal), ("gt", np.greater), ("gte", np.greater_equal)):
                if f.HasField(op):
                    assert holds(years, getattr(f, op)).all(), f"a year outside {op} {getattr(f, op)}"
    u = library.users.get(user_id) if user_id else None
    if u is not None and not request.include_seen and not request.ratings:
        seen = set(library.items.external(library.seen_indices[library.seen_indptr[u] : library.seen_indptr[u + 1]]))
        assert not seen & set(items), "a seen item"


def call(served, method: str, request, service: str = "Recommender"):
    """Send one request; returns the reply or None, after checking the status."""
    _, channel, _, _, tally = served
    stub = (pb_grpc.RecommenderStub if service == "Recommender" else pb_grpc.AdminStub)(channel)
    try:
        reply = getattr(stub, method)(request, timeout=60)
        tally["OK"] += 1
        return reply
    except grpc.RpcError as e:
        tally[e.code().name] += 1
        assert e.code() in OK_CODES, f"{method}: {e.code().name}: {e.details()}"
        assert len(e.details() or "") <= 1_100, "the status message echoes a huge value"
        return None


# ------------------------------------------------------------------ fuzzing
@FUZZ
@given(
    events=st.lists(
        st.tuples(
            ids("u", 400),
            ids("i", 300),
            st.sampled_from(["view", "click", "purchase", "rating", "", "teleport"]),
            st.one_of(st.none(), NUMBERS),
            st.one_of(st.none(), NUMBERS),
        ),
        max_size=8,
    )
)
def test_fuzz_record_feedback(served, events):
    """Events of known and unknown users and items, valid and invalid kinds, values and
    times: recorded whole or refused whole. (First, so that the users the later fuzzing
    asks for include users with live events, odd values among them.)"""
    request = pb.RecordFeedbackRequest()
    for user, item, kind, value, stamp in events:
        event = request.events.add(user_id=user, item_id=item, kind=kind)
        if value is not None:
            event.value = value
        if stamp is not None:
            event.timestamp = stamp
    reply = call(served, "RecordFeedback", request)
    if reply is not None:
        assert reply.recorded == len(events)


@FUZZ
@given(request=recommend_requests())
def test_fuzz_recommend(served, request):
    reply = call(served, "Recommend", request)
    if reply is not None:
        check_items(reply.items, request.k if request.HasField("k") else 10, served[2], request, request.user_id)


@FUZZ
@given(users=st.lists(ids("u", 400), max_size=60), options=recommend_requests(with_user=False))
def test_fuzz_recommend_batch(served, users, options):
    reply = call(served, "RecommendBatch", pb.RecommendBatchRequest(user_ids=users, options=options))
    if reply is not None:
        assert len(reply.results) == len(users)
        for user, result in zip(users, reply.results):
            check_items(result.items, options.k if options.HasField("k") else 10, served[2], options, user)


@FUZZ
@given(item=ids("i", 300), k=SIZES)
def test_fuzz_similar_items(served, item, k):
    request = pb.SimilarItemsRequest(item_id=item)
    if k is not None:
        request.k = k
    reply = call(served, "SimilarItems", request)
    if reply is not None:
        check_items(reply.items, k if k is not None else 10, served[2])
        assert item not in [i.item_id for i in reply.items]


@FUZZ
@given(
    user=st.one_of(st.just(""), ids("u", 400)),
    items=st.lists(ids("i", 300), max_size=20),
    features=FEATURES,
    ratings=st.dictionaries(ids("i", 300), NUMBERS, max_size=3),
)
def test_fuzz_score(served, user, items, features, ratings):
    request = pb.ScoreRequest(user_id=user, item_ids=items, ratings=ratings)
    set_features(request.user_features, features)
    reply = call(served, "Score", request)
    if reply is not None:
        check_items(reply.items, len(items), served[2])


@FUZZ
@given(
    new=st.lists(
        st.tuples(
            st.one_of(st.text(max_size=20), st.text(min_size=300, max_size=2000)), st.text(max_size=50), FEATURES
        ),
        max_size=6,
    )
)
def test_fuzz_add_items(served, new):
    request = pb.AddItemsRequest(items=[pb.NewItem(item_id=f"fz-{i}", title=t) for i, t, _ in new])
    for item, (_, _, features) in zip(request.items, new):
        set_features(item.features, features)
    reply = call(served, "AddItems", request)
    if reply is not None:
        assert reply.n_items >= served[2].bundle.manifest.dataset.n_items + len(new)


@FUZZ
@given(
    payload=st.binary(max_size=300),
    method=st.sampled_from([(s.full_name, m.name) for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]),
)
def test_fuzz_raw_bytes(served, payload, method):
    """Arbitrary bytes to every rpc: a valid message by chance is served, anything else
    is INVALID_ARGUMENT."""
    _, channel, _, _, tally = served
    try:
        channel.unary_unary(f"/{method[0]}/{method[1]}")(payload, timeout=60)
        tally["OK"] += 1
    except grpc.RpcError as e:
        tally[e.code().name] += 1
        assert e.code() in OK_CODES, f"{method}: {e.code().name}: {e.details()}"


# ------------------------------------------------------------------ concurrency
def test_readers_while_items_are_added_and_the_bundle_reloads(served):
    """Four reader threads (Recommend with and without genre filters, RecommendBatch,
    SimilarItems on bundle and on just-added items, Score) while one thread adds 1-50
    items per call, one records events and another reloads: every call succeeds, every
    reply keeps the contract, every added item is served, and the server process survives."""
    proc, channel, library, root, tally = served
    recommender, admin = pb_grpc.RecommenderStub(channel), pb_grpc.AdminStub(channel)
    stop = threading.Event()
    errors: list[str] = []
    counts: collections.Counter = collections.Counter()
    added: list[str] = []
    rng = np.random.default_rng(0)
    genre = library.genre_labels[1]

    def guarded(name, body):
        def run():
            local = np.random.default_rng(hash(name) % 2**32)
            while not stop.is_set():
                try:
                    body(local)
                    counts[name] += 1
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    errors.append(f"{name}: {type(e).__name__}: {e.details() if isinstance(e, grpc.RpcError) else e}")
                    return

        return threading.Thread(target=run, name=name)

    def recommend(local):
        user = f"u{local.integers(400)}"
        request = pb.RecommendRequest(user_id=user, genres=[genre] if local.random() < 0.5 else [])
        check_items(recommender.Recommend(request, timeout=30).items, 10, library, request, user)

    def batch(local):
        users = [f"u{u}" for u in local.integers(0, 400, 20)] + ["nobody"]
        reply = recommender.RecommendBatch(
            pb.RecommendBatchRequest(user_ids=users, options=pb.RecommendRequest(k=5)), timeout=30
        )
        for user, result in zip(users, reply.results):
            check_items(result.items, 5, library, pb.RecommendRequest(), user)

    def similar(local):
        item = added[int(local.integers(len(added)))] if added and local.random() < 0.5 else f"i{local.integers(300)}"
        check_items(recommender.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=8), timeout=30).items, 8, library)

    def score(local):
        items = [f"i{i}" for i in local.choice(300, 5, replace=False)] + added[-2:]
        reply = recommender.Score(pb.ScoreRequest(user_id=f"u{local.integers(400)}", item_ids=items), timeout=30)
        assert all(math.isfinite(i.score) for i in reply.items)

    def add(local):
        n = int(local.integers(1, 51))
        new = [f"live-{len(added) + j}" for j in range(n)]
        flags = [float(x) for x in (local.random(len(library.genre_labels)) < 0.3)]
        recommender.AddItems(
            pb.AddItemsRequest(
                items=[
                    pb.NewItem(
                        item_id=i, title=i, features={"genres": pb.FeatureValue(numbers=pb.NumberList(values=flags))}
                    )
                    for i in new
                ]
            ),
            timeout=30,
        )
        added.extend(new)
        time.sleep(0.05)

    recorded: list[str] = []

    def record(local):  # events of known users (on bundle and just-added items) and new ones
        items = [f"i{i}" for i in local.integers(0, 300, 20)] + added[-3:]
        users = [f"u{u}" for u in local.integers(0, 400, 20)] + [f"visitor-{len(recorded)}"]
        events = [pb.FeedbackEvent(user_id=str(local.choice(users)), item_id=i, kind="click") for i in items]
        recommender.RecordFeedback(pb.RecordFeedbackRequest(events=events), timeout=30)
        recorded.append(users[-1])
        time.sleep(0.02)

    versions = bundle.list_versions(root)

    def reload(local):  # flip `current` between the two versions, then Reload: a real swap each time
        bundle.set_current(root, versions[counts["reload"] % 2])
        assert admin.Reload(pb.ReloadRequest(), timeout=60).version
        time.sleep(0.1)

    threads = [
        guarded(name, body)
        for name, body in [
            ("recommend", recommend),
            ("recommend-2", recommend),
            ("batch", batch),
            ("similar", similar),
            ("score", score),
            ("add", add),
            ("record", record),
            ("reload", reload),
        ]
    ]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    print(f"\nconcurrency: {dict(counts)}, {len(added)} items added, errors {errors[:3]}")
    assert errors == [] and proc.poll() is None
    assert min(counts.values()) > 0 and counts["add"] >= 5
    # Every acknowledged item is served, by its id.
    for item in rng.choice(added, min(20, len(added)), replace=False).tolist():
        assert recommender.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=3), timeout=30).items
    tally["OK"] += sum(counts.values())
