"""Live feedback: events recorded through the library and the gRPC service change the
user's next request (seen items, recent likes, CF fold-in, new users), are validated all
or nothing, survive restarts and SIGKILL, reach the other server processes, and are
trained on by the next bundle, which replays only the events after its cut-off."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from engine.data import Dataset, FeatureTable, IdMap
from engine.data.feedback import FEEDBACK_LOG, FeedbackEvents, read_log, with_feedback
from engine.errors import InvalidRequest, UnknownIdError
from engine.index import bundle
from engine.service.client import Client, RemoteInvalidRequest, RemoteUnknownId
from engine.service.processes import spawn_server
from engine.service.server import ServerConfig, TandemServer
from engine.serving.engine import Engine, EngineConfig
from engine.serving.users import KNOWN, LIVE
from engine.settings import FeedbackConfig
from index_builder import build_bundle

CONFIG = EngineConfig(segment_key="occupation")
SETTINGS = ("engine.segment_key=occupation",)


@pytest.fixture(scope="module")
def published(small_models, tmp_path_factory):
    """A bundle root built from the shared small models (copied by each test that writes)."""
    ds, cf, towers = small_models
    root = tmp_path_factory.mktemp("feedback") / "root"
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    return ds, root


@pytest.fixture
def root(published, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(published[1], copy, symlinks=True)
    return copy


def click(user, item, **more):
    return {"user_id": user, "item_id": item, "kind": "click", **more}


def same(a, b):
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert a.served_by == b.served_by


# ------------------------------------------------------------ the effect
def test_an_event_changes_the_users_next_request(published, root):
    ds, _ = published
    engine = Engine.load(root, CONFIG)
    user = ds.users.ids[3]
    before = engine.recommend(user, k=10)
    assert before.served_by == KNOWN
    item = str(before.item_ids[0])
    engine.record([click(user, item)])
    after = engine.recommend(user, k=10)
    assert after.served_by == LIVE
    assert item not in after.item_ids  # a seen item now, excluded by default
    assert item in engine.recommend(user, k=300, exclude_seen=False).item_ids
    # A click is a like: the item leads the user's recent likes, so its nearest unseen
    # item is what the recent source proposes first.
    live = engine.feedback.user(engine.feedback.live_index(user, 3))
    assert engine.items.external(live.recent[0, :1])[0] == item
    seen = set(engine.items.external(live.history))
    nearest = [i for i in engine.similar_items(item, k=30).item_ids if i not in seen][0]
    assert engine.items.external(engine.candidates(user)["recent"][:1])[0] == nearest
    # The CF vector was refitted from the user's whole history: the scores moved.
    shared = np.intersect1d(before.item_ids[1:], after.item_ids)
    old = dict(zip(before.item_ids, before.scores))
    new = dict(zip(after.item_ids, after.scores))
    assert any(abs(old[i] - new[i]) > 1e-4 for i in shared)


def test_the_fold_in_is_the_users_whole_history(published, root):
    """A user's live CF vector is the fold-in of their training interactions plus their
    events, valued by the rule: a rating replaces, a click keeps the pair's value or
    takes the default, and the history is the union."""
    ds, _ = published
    engine = Engine.load(root, CONFIG)
    u = 7
    user = ds.users.ids[u]
    seen = engine.seen_indices[engine.seen_indptr[u] : engine.seen_indptr[u + 1]]
    rated = ds.user_items()[u]
    unseen = np.setdiff1d(np.arange(ds.n_items), seen)[:2]
    engine.record(
        [
            {"user_id": user, "item_id": str(ds.items.ids[seen[0]]), "kind": "rating", "value": 1.5},
            click(user, str(ds.items.ids[seen[1]])),  # no value: keeps the training rating
            click(user, str(ds.items.ids[unseen[0]])),  # a new pair: the default value
            {"user_id": user, "item_id": str(ds.items.ids[unseen[1]]), "kind": "rating", "value": 4.0},
        ]
    )
    values = dict(zip(rated.indices.tolist(), rated.data.tolist()))
    values[int(seen[0])] = 1.5
    values[int(unseen[0])] = 1.0
    values[int(unseen[1])] = 4.0
    items = np.array(sorted(values))
    expected = engine.cf.fold_in_indices(items, np.array([values[i] for i in items.tolist()]))
    state = engine.feedback.user(engine.feedback.live_index(user, u))
    np.testing.assert_array_equal(state.history, items)
    np.testing.assert_allclose(state.cf_query[0], engine.cf.fold_in_query(expected), rtol=1e-5, atol=1e-6)
    assert state.recent[0, 0] == unseen[1]  # the latest like (a rating of 4) first


def test_a_new_user_is_served_from_their_events(published, root):
    ds, _ = published
    engine = Engine.load(root, CONFIG)
    cold = engine.recommend("visitor-1", k=10)
    items = [str(i) for i in cold.item_ids[:3]]
    recorded = engine.record([click("visitor-1", i) for i in items])
    assert (recorded.events, recorded.new_users) == (3, 1)
    served = engine.recommend("visitor-1", k=10)
    assert served.served_by == LIVE and not set(items) & set(served.item_ids)
    assert {"cf", "recent"} <= set(engine.candidates("visitor-1"))  # fold-in vector, recent likes
    assert served.item_ids.tolist() != cold.item_ids.tolist()
    assert engine.record([click("visitor-1", str(ds.items.ids[0]))]).new_users == 0
    # An item added live has no CF vector: an event on it makes it a seen item only.
    engine.add_items(["fresh-item"], [{"year": 1999}], persist=False)
    engine.record([click("visitor-1", "fresh-item")])
    state = engine.feedback.user(engine.feedback.live_index("visitor-1", None))
    assert engine.items.index("fresh-item") in state.history and engine.items.index("fresh-item") not in state.recent
    assert "fresh-item" not in engine.recommend("visitor-1", k=300).item_ids


def test_batch_and_lone_requests_agree_for_users_with_events(published, root):
    ds, _ = published
    engine = Engine.load(root, CONFIG)
    users = [ds.users.ids[1], "visitor-2", ds.users.ids[2], "nobody"]
    engine.record([click(users[0], ds.items.ids[5]), click("visitor-2", ds.items.ids[9])])
    batch = engine.recommend_batch(users, k=8, threads=1)
    for user, result in zip(users, batch):
        same(result, engine.recommend(user, k=8))
    assert [r.served_by for r in batch] == [LIVE, LIVE, KNOWN, "popularity"]


# ------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "event, error, words",
    [
        ({"user_id": "u1", "item_id": "no-such-item", "kind": "click"}, UnknownIdError, "unknown item id"),
        ({"user_id": "u1", "item_id": "i1", "kind": "teleport"}, InvalidRequest, "unknown kind"),
        ({"user_id": "u1", "item_id": "i1", "kind": "rating"}, InvalidRequest, "needs a value"),
        ({"user_id": "u1", "item_id": "i1", "kind": "click", "value": float("nan")}, InvalidRequest, "finite"),
        ({"user_id": "u1", "item_id": "i1", "kind": "click", "value": -1}, InvalidRequest, ">= 0"),
        ({"user_id": "u1", "item_id": "i1", "kind": "click", "value": "5"}, InvalidRequest, "a number"),
        ({"user_id": "u1", "item_id": "i1", "kind": "click", "timestamp": -5}, InvalidRequest, "timestamp"),
        ({"user_id": "", "item_id": "i1", "kind": "click"}, InvalidRequest, "user_id"),
        ({"user_id": "u1", "item_id": "i1", "kind": "click", "colour": 1}, InvalidRequest, "unknown field"),
        ({"user_id": "u" * 300, "item_id": "i1", "kind": "click"}, InvalidRequest, "max_id_length"),
    ],
)
def test_a_bad_event_records_nothing_of_its_batch(published, root, event, error, words):
    engine = Engine.load(root, CONFIG)
    with pytest.raises(error, match=words):
        engine.record([click("u1", "i2"), event])  # the good event goes neither
    assert engine.feedback.n_events == 0 and not (root / FEEDBACK_LOG).exists()
    assert engine.recommend("u1").served_by == KNOWN


# ------------------------------------------------------------ durability
def test_events_are_replayed_on_load_and_a_bad_log_line_is_skipped(published, root, caplog):
    ds, _ = published
    engine = Engine.load(root, CONFIG)
    user = ds.users.ids[4]
    engine.record([click(user, ds.items.ids[1]), click("visitor-3", ds.items.ids[2])])
    with open(root / FEEDBACK_LOG, "ab") as log:
        log.write(b"this is not an event\n")
    engine.record([click(user, ds.items.ids[3])])
    with open(root / FEEDBACK_LOG, "ab") as log:
        log.write(b'{"user_id": "u4", "item_id": "i4", "ki')  # a write cut short by a crash
    with caplog.at_level(logging.WARNING):
        again = Engine.load(root, CONFIG)
    assert "journal_line_skipped" in caplog.text and "line 3" in caplog.text
    assert "feedback_partial_line_skipped" in caplog.text
    assert again.feedback.n_events == 3
    for who in (user, "visitor-3"):
        same(again.recommend(who, k=10), engine.recommend(who, k=10))
    again.record([click(user, ds.items.ids[6])])  # the torn tail is cut off first
    lines = (root / FEEDBACK_LOG).read_bytes().split(b"\n")
    assert lines[-1] == b"" and json.loads(lines[-2])["item_id"] == ds.items.ids[6]
    assert len(read_log(root / FEEDBACK_LOG)[0]) == 4


def test_a_sigkilled_server_loses_no_acknowledged_event(published, root, tmp_path):
    """Bursts of RecordFeedback batches from two threads; the server is killed with
    SIGKILL mid-burst. Every event whose batch was acknowledged is in the log and is
    replayed by the next load."""
    ds, _ = published
    proc, port = spawn_server(root, tmp_path / "port", "--log-level", "WARNING", settings=SETTINGS)
    acknowledged: list[tuple[str, float]] = []
    stop = threading.Event()

    def burst(worker: int) -> None:
        n = 0
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            while not stop.is_set():
                events = [
                    {"user_id": f"w{worker}-{n}", "item_id": ds.items.ids[j % 50], "kind": "view", "timestamp": j}
                    for j in range(100)
                ]
                try:
                    client.record(events)
                except grpc.RpcError:
                    return
                acknowledged.extend((e["user_id"], e["timestamp"]) for e in events)
                n += 1

    workers = [threading.Thread(target=burst, args=(w,)) for w in range(2)]
    try:
        for w in workers:
            w.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
        if proc.poll() is None:
            proc.kill()
    assert len(acknowledged) >= 1000  # the kill came mid-burst, after many batches
    logged, _ = read_log(root / FEEDBACK_LOG)
    assert set(acknowledged) <= set(zip(logged.user_ids, logged.timestamps.tolist()))
    assert Engine.load(root, CONFIG).feedback.n_events == len(logged)


def test_two_server_processes_see_each_others_events_within_a_second(published, root, tmp_path):
    ds, _ = published
    first = spawn_server(root, tmp_path / "port1", "--log-level", "WARNING", settings=SETTINGS)
    second = spawn_server(root, tmp_path / "port2", "--log-level", "WARNING", settings=SETTINGS)
    try:
        with Client(f"127.0.0.1:{first[1]}") as a, Client(f"127.0.0.1:{second[1]}") as b:
            user = ds.users.ids[10]
            assert b.recommend(user).served_by == KNOWN
            a.record([click(user, ds.items.ids[0])])
            b.record([click("visitor-4", ds.items.ids[1])])
            time.sleep(1.0)
            assert b.recommend(user).served_by == LIVE
            assert a.recommend("visitor-4").served_by == LIVE
            same(a.recommend(user), b.recommend(user))
    finally:
        for proc, _ in (first, second):
            proc.terminate()
            proc.wait(timeout=60)


# --------------------------------------------------------------- the rpc
def test_record_feedback_over_grpc(published, root):
    ds, _ = published
    server = TandemServer(root, ServerConfig(port=0, max_batch=5, token="s3cret"), CONFIG).start()
    try:
        target = f"127.0.0.1:{server.port}"
        with Client(target) as anonymous:
            with pytest.raises(grpc.RpcError) as denied:
                anonymous.record([click("u1", "i1")])
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token="s3cret") as client:
            assert client.record([click("visitor-5", "i1"), click("u1", "i2", value=2.0)]) == {
                "recorded": 2,
                "new_users": 1,
            }
            assert client.recommend("visitor-5").served_by == LIVE
            with pytest.raises(RemoteUnknownId, match="no-such"):
                client.record([click("u1", "no-such")])
            with pytest.raises(RemoteInvalidRequest, match="needs a value"):
                client.record([{"user_id": "u1", "item_id": "i1", "kind": "rating"}])
            with pytest.raises(RemoteInvalidRequest, match="at most 5"):
                client.record([click("u1", "i1")] * 6)
            assert server.holder.engine.feedback.n_events == 2
            info = client.info()
            assert (int(info["feedback_events"]), int(info["feedback_users"])) == (2, 2)
    finally:
        server.stop(0)


# -------------------------------------------------------------- training
def test_with_feedback_merges_events_by_the_rule():
    """A hand-computed case: a rating replaces, a valueless click keeps the pair's value
    (or takes the default on a new pair), a new user is appended without features, an
    event of an unknown item is skipped, and a pair's time is its latest."""
    users, items = IdMap(["a", "b"], "user"), IdMap(["x", "y", "z"], "item")
    base = Dataset(
        np.array([0, 0, 1]),
        np.array([0, 1, 1]),
        np.array([4.0, 2.0, 5.0]),
        np.array([10, 20, 30]),
        users,
        items,
        user_features=FeatureTable({"age": np.array([30.0, 40.0], np.float32), "zip": np.array(["1", "2"])}),
    )
    events = FeedbackEvents(
        ["a", "a", "b", "c", "c", "a"],
        ["x", "y", "z", "x", "x", "nope"],
        ["rating", "click", "click", "click", "rating", "click"],
        np.array([1.0, np.nan, np.nan, np.nan, 3.0, np.nan]),
        np.array([5.0, 50.0, 60.0, 70.0, 80.0, 90.0]),
    )
    merged = with_feedback(base, events, FeedbackConfig(default_value=2.5), log_offset=123, log=lambda line: None)
    got = {
        (merged.users.ids[u], merged.items.ids[i]): (r, t)
        for u, i, r, t in zip(merged.user_idx, merged.item_idx, merged.ratings.tolist(), merged.timestamps.tolist())
    }
    assert got == {
        ("a", "x"): (1.0, 10),
        ("a", "y"): (2.0, 50),
        ("b", "y"): (5.0, 30),
        ("b", "z"): (2.5, 60),
        ("c", "x"): (3.0, 80),
    }
    assert merged.feedback_offset == 123 and list(merged.users.ids) == ["a", "b", "c"]
    assert np.isnan(merged.user_features.columns["age"][2]) and merged.user_features.columns["zip"][2] == ""
    implicit = Dataset(np.array([0]), np.array([0]), np.ones(1), np.zeros(1), users, items)
    kept = with_feedback(implicit, events, FeedbackConfig(), log=lambda line: None)
    assert kept.implicit and set(kept.ratings.tolist()) == {1.0}  # implicit data has no scale


def test_a_bundle_trained_on_the_log_replays_only_the_events_after_its_cutoff(small_models, root):
    from engine.models.cf import train_cf
    from engine.models.towers import train_two_tower
    from index_builder.train import with_recorded_feedback

    ds, _, _ = small_models
    engine = Engine.load(root, CONFIG)
    engine.record([click("visitor-6", ds.items.ids[i]) for i in range(5)] + [click(ds.users.ids[0], ds.items.ids[7])])
    config = {"engine": {"feedback": {}}}
    merged = with_recorded_feedback(ds, root, config, log=lambda line: None)
    assert merged.n_users == ds.n_users + 1 and merged.feedback_offset == (root / FEEDBACK_LOG).stat().st_size
    engine.record([click("visitor-7", ds.items.ids[3])])  # after the cut-off
    cf = train_cf(merged, n_features=8, epochs=2, progress=False)
    towers = train_two_tower(merged, objective="softmax", hidden_layers=(16,), output_dim=8, epochs=1, progress=False)
    build_bundle(merged, cf, towers, root, log=lambda line: None)
    fresh = Engine.load(root, CONFIG)
    assert bundle.read_manifest(bundle.resolve(root)).feedback == {"offset": merged.feedback_offset}
    assert fresh.feedback.n_events == 1  # only visitor-7's event is replayed
    assert fresh.recommend("visitor-6").served_by == KNOWN  # a user of the bundle now
    assert fresh.recommend("visitor-7").served_by == LIVE


def test_a_training_users_fold_in_keeps_the_attribute_prior_of_training(small_models, tmp_path):
    """With ALS's attribute prior (the serving preset), a training user's live CF vector
    is their fold-in shrunk toward the prior mean training gave them, not toward zero."""
    from engine.models.cf import PRESETS, train_cf

    ds, _, towers = small_models
    cf = train_cf(ds, **{**PRESETS["topn"], "n_features": 8, "progress": False})
    assert cf.user_prior is not None
    build_bundle(ds, cf, towers, tmp_path / "root", log=lambda line: None)
    engine = Engine.load(tmp_path / "root", CONFIG)
    u = 11
    user = ds.users.ids[u]
    rated = ds.user_items()[u]
    unseen = np.setdiff1d(np.arange(ds.n_items), rated.indices)[0]
    engine.record([click(user, str(ds.items.ids[unseen]))])
    items = np.union1d(rated.indices, [unseen])
    given = dict(zip(rated.indices.tolist(), rated.data.tolist()))
    values = np.array([given.get(i, 1.0) for i in items.tolist()])  # a new pair takes the default
    expected = engine.cf.fold_in_indices(items, values, engine.cf.user_prior[u])
    state = engine.feedback.user(engine.feedback.live_index(user, u))
    np.testing.assert_allclose(state.cf_query[0], engine.cf.fold_in_query(expected), rtol=1e-5, atol=1e-6)
    toward_zero = engine.cf.fold_in_query(engine.cf.fold_in_indices(items, values))
    assert not np.allclose(state.cf_query[0], toward_zero, atol=1e-4)
