"""One contract for every VectorIndex backend (engine.index.vector_index): exact
backends equal a NumPy brute force written here, approximate ones reach a recall floor,
filters hold, adding leaves the original unchanged, and save/load round-trips. A new
backend joins by adding one entry to BACKENDS: Milvus (Milvus Lite, an embedded file)
is one, skipped with its reason where pymilvus is not installed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from engine.index.exact import ExactIndex
from engine.index.faiss_index import FaissIndex, build_index
from engine.index.vector_index import VectorIndex, pack_mask, unpack_bits

N, DIM, K = 600, 12, 10


def faiss_index(factory: str):
    def make(vectors, metric):
        index, _ = build_index(vectors, metric, factory, k=K, recall_floor=0.99, n_queries=100)
        return index

    return make


_MILVUS_DB: list[Path] = []  # one Milvus Lite file per test process


def milvus_index(factory: str):
    def make(vectors, metric):
        pytest.importorskip("pymilvus", reason="the Milvus backend needs the milvus extra (pip install -e '.[milvus]')")
        from engine.index import milvus_index

        if not _MILVUS_DB:
            _MILVUS_DB.append(Path(tempfile.mkdtemp(prefix="tandem-milvus-")) / "contract.db")
        target = milvus_index.MilvusTarget.of(str(_MILVUS_DB[0]))
        index, _ = milvus_index.build_index(
            vectors, metric, factory, target, "contract", k=K, recall_floor=0.99, n_queries=100
        )
        return index

    return make


def load_milvus(path, metric, like):
    from engine.index.milvus_index import MilvusIndex

    return MilvusIndex.load(path)


# name -> (build(vectors, metric), exact?, load(path, metric, like))
BACKENDS = {
    "exact": (
        lambda vectors, metric: ExactIndex(vectors, metric),
        True,
        lambda path, metric, like: ExactIndex.load(path),
    ),
    "faiss-flat": (
        faiss_index("Flat"),
        True,
        lambda path, metric, like: FaissIndex.load(path, metric, like.search_params),
    ),
    "faiss-hnsw": (
        faiss_index("HNSW16"),
        False,
        lambda path, metric, like: FaissIndex.load(path, metric, like.search_params),
    ),
    "faiss-ivf": (
        faiss_index("IVF16,Flat"),
        False,
        lambda path, metric, like: FaissIndex.load(path, metric, like.search_params),
    ),
    # (Milvus's HNSW is not here: Milvus Lite builds it in the background and searches
    # exactly until then, so two searches of one collection may differ; its recall is
    # what bench-milvus reports.)
    "milvus-flat": (milvus_index("Flat"), True, load_milvus),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, DIM)).astype(np.float32), rng.normal(size=(40, DIM)).astype(np.float32)


def brute_force(vectors, queries, k, metric, allowed=None):
    """The reference: every score, disallowed items dropped, best first."""
    if metric == "ip":
        scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    else:
        scores = -((queries[:, None, :].astype(np.float64) - vectors[None].astype(np.float64)) ** 2).sum(-1)
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    labels = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    valid = np.isfinite(np.take_along_axis(scores, labels, 1))
    return np.where(valid, labels, -1), np.abs(np.take_along_axis(scores, labels, 1))


def recall(got, want):
    return np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1) for g, w in zip(got, want)])


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_equals_brute_force_or_reaches_recall(data, backend, metric):
    vectors, queries = data
    build, exact, _ = BACKENDS[backend]
    index = build(vectors, metric)
    assert isinstance(index, VectorIndex) and len(index) == N and index.dim == DIM and index.metric == metric
    scores, labels = index.search(queries, K)
    assert scores.shape == labels.shape == (len(queries), K)
    want, want_scores = brute_force(vectors, queries, K, metric)
    if exact:
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_allclose(np.abs(scores), want_scores, rtol=1e-4, atol=1e-4)
    else:
        assert recall(labels, want) >= 0.9
    # best first: inner products descending, squared distances ascending
    assert np.all(np.diff(scores, axis=1) <= 1e-5) if metric == "ip" else np.all(np.diff(scores, axis=1) >= -1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_are_respected_inside_the_search(data, backend):
    vectors, queries = data
    build, exact, _ = BACKENDS[backend]
    index = build(vectors, "ip")
    allowed = np.random.default_rng(1).random(N) < 0.3
    bits = pack_mask(allowed)
    np.testing.assert_array_equal(unpack_bits(bits, N), allowed)
    _, labels = index.search(queries, K, allowed=bits)
    assert allowed[labels[labels >= 0]].all()
    want, _ = brute_force(vectors, queries, K, "ip", allowed)
    if exact:
        np.testing.assert_array_equal(labels, want)
    else:
        assert recall(labels, want) >= 0.9
    few = np.zeros(N, bool)
    few[[3, 70, 599]] = True  # fewer allowed items than k: those, then -1
    _, labels = index.search(queries[:5], K, allowed=pack_mask(few))
    for row in labels:
        assert set(row[row >= 0]) <= {3, 70, 599}
        if exact:
            assert sorted(row[row >= 0]) == [3, 70, 599] and (row[3:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_added_returns_a_new_index_and_leaves_this_one(data, backend):
    vectors, queries = data
    build, _, _ = BACKENDS[backend]
    index = build(vectors, "l2")
    before = index.search(queries, K)
    extra = queries[:3] + 1e-3  # near the first three queries: their nearest items now
    grown = index.added(extra)
    assert len(grown) == N + 3 and len(index) == N
    for a, b in zip(index.search(queries, K), before):
        np.testing.assert_array_equal(a, b)
    _, labels = grown.search(queries[:3], 1)
    assert labels[:, 0].tolist() == [N, N + 1, N + 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_load_round_trip(data, backend, tmp_path):
    vectors, queries = data
    build, _, load = BACKENDS[backend]
    index = build(vectors, "ip")
    index.save(tmp_path / "index")
    again = load(tmp_path / "index", "ip", index)
    for a, b in zip(again.search(queries, K), index.search(queries, K)):
        np.testing.assert_array_equal(a, b)


def test_exact_index_hand_computed():
    items = np.array([[5.0], [4.0], [3.0], [-1.0]], np.float32)
    index = ExactIndex(items, "ip")
    scores, labels = index.search(np.array([[1.0], [-1.0]]), 2)
    assert labels.tolist() == [[0, 1], [3, 2]] and scores.tolist() == [[5.0, 4.0], [1.0, -3.0]]
    scores, labels = ExactIndex(items, "l2").search(np.array([[3.4]]), 3)
    assert labels.tolist() == [[2, 1, 0]]
    np.testing.assert_allclose(scores, [[0.16, 0.36, 2.56]], rtol=1e-5)
    _, labels = index.search(np.array([[1.0]]), 3, allowed=pack_mask(np.array([False, True, False, True])))
    assert labels.tolist() == [[1, 3, -1]]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_milvus_applies_a_long_filter_after_an_overfetched_search(data, metric, monkeypatch):
    """A filter longer than MAX_EXPRESSION_IDS is not pushed into the expression but
    applied to an over-fetched result: the same answer as exact search."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs the milvus extra")
    from engine.index import milvus_index

    vectors, queries = data
    index = BACKENDS["milvus-flat"][0](vectors, metric)
    monkeypatch.setattr(milvus_index, "MAX_EXPRESSION_IDS", 5)
    for share in (0.05, 0.5, 0.95):  # few allowed: over-fetched up to the whole collection
        allowed = np.random.default_rng(2).random(N) < share
        _, labels = index.search(queries, K, allowed=pack_mask(allowed))
        want, _ = brute_force(vectors, queries, K, metric, allowed)
        np.testing.assert_array_equal(labels, want)
