"""The compiled history features against plain Python loops of their definitions, on a
batch with the edge cases: a user without history, -1 pads, items beyond a table, a
categorical value missing, duplicate history entries."""

import numpy as np
import pytest

from engine.serving import feature_kernels as k

N_ITEMS = 30


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    histories = [[1, 4, 4, 9], [], [2, 3, 5, 7, 11, 13], [29]]
    indptr = np.cumsum([0] + [len(h) for h in histories]).astype(np.int64)
    history = np.array([i for h in histories for i in h], np.int32)
    rows = np.repeat(np.arange(4), 6).astype(np.int64)
    items = rng.integers(0, N_ITEMS, len(rows)).astype(np.int64)
    items[[0, 7]] = [25, 27]  # beyond the 24-row tables below
    return histories, indptr, history, rows, items


def test_weights_from_history(batch):
    histories, indptr, history, rows, items = batch
    rng = np.random.default_rng(4)
    neighbours = rng.integers(-1, N_ITEMS, (24, 5)).astype(np.int32)
    weights = rng.random((24, 5)).astype(np.float32)
    marked = np.zeros(N_ITEMS + 1, bool)
    got = k.weights_from_history(neighbours, weights, indptr, history, rows, items, marked)
    assert not marked.any()  # the scratch is left as it came, for the next table
    for j, (u, i) in enumerate(zip(rows, items)):
        if not histories[u] or i >= 24:
            assert np.isnan(got[j])
        else:
            mine = set(histories[u])
            want = sum(float(w) for n, w in zip(neighbours[i], weights[i]) if n >= 0 and n in mine)
            assert got[j] == pytest.approx(want, rel=1e-6)


def test_recent_similarity(batch):
    _, _, _, rows, items = batch
    rng = np.random.default_rng(5)
    unit = rng.normal(size=(24, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    liked = np.array([[3, 5, -1], [-1, -1, -1], [26, 7, 1], [2, -1, -1]], np.int64)  # 26: beyond unit
    largest, mean = k.recent_similarity(unit, liked, rows, items)
    for j, (u, i) in enumerate(zip(rows, items)):
        likes = [like for like in liked[u] if 0 <= like < 24]
        if i >= 24 or not likes:
            assert np.isnan(largest[j]) and np.isnan(mean[j])
        else:
            cosines = [float(unit[i] @ unit[like]) for like in likes]
            assert largest[j] == pytest.approx(max(cosines), abs=1e-6)
            assert mean[j] == pytest.approx(np.mean(cosines), abs=1e-6)


def test_label_and_code_affinity(batch):
    histories, indptr, history, rows, items = batch
    rng = np.random.default_rng(6)
    flags = (rng.random((N_ITEMS, 4)) < 0.4).astype(np.uint8)
    flags[items[2]] = 0  # an item without labels: a share of 0
    codes = rng.integers(-1, 3, N_ITEMS).astype(np.int64)
    labels = k.label_affinity(flags, indptr, history, rows, items)
    shares = k.code_affinity(codes, 3, indptr, history, rows, items)
    for j, (u, i) in enumerate(zip(rows, items)):
        h = histories[u]
        if not h:
            assert np.isnan(labels[j]) and np.isnan(shares[j])
            continue
        own = np.flatnonzero(flags[i])
        want = np.mean([np.mean([flags[x, label] for x in h]) for label in own]) if len(own) else 0.0
        assert labels[j] == pytest.approx(want, rel=1e-6, abs=1e-7)
        same = 0.0 if codes[i] < 0 else np.mean([codes[x] == codes[i] for x in h])
        assert shares[j] == pytest.approx(same, rel=1e-6, abs=1e-7)


def test_pair_columns_and_segment_counts():
    rows = np.array([0, 0, 1], np.int64)
    items = np.array([1, 3, 0], np.int64)  # item 3 lies beyond the 3-row tables (added live)
    bits = np.array([0b101, 0b010, 0b000], np.uint32)
    shifts = np.array([0, 1, -1, 2], np.int64)  # the third source is absent from the request
    popularity = np.array([0.0, 4.0, 9.0, 0.0], np.float32)
    trend_age = np.array([[1.0, 0.1], [2.0, 0.2], [3.0, 0.3]], np.float32)
    rates = np.array([[0.5, 3.5], [0.6, 3.6], [0.7, 3.7]], np.float32)
    lengths = np.array([3, 0], np.int64)
    got = k.pair_columns(rows, items, np.array([0, 1, 0]), bits, shifts, popularity, trend_age, rates, lengths)
    want = np.array(
        [
            [1, 0, 0, 1, 2, 0, np.log1p(4.0), 2.0, 0.2, np.log1p(3), 0.6, 3.6],
            [0, 1, 0, 0, 1, 1, np.log1p(0.0), 0.0, 0.0, np.log1p(3), np.nan, np.nan],
            [0, 0, 0, 0, 0, 0, np.log1p(0.0), 1.0, 0.1, 0.0, 0.5, 3.5],
        ],
        np.float32,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)

    keys = np.array([0 * 2**31 + 2, 1 * 2**31 + 0, 1 * 2**31 + 5], np.int64)  # sorted (segment, item)
    counts = np.array([1.5, 2.5, 3.5], np.float32)
    got = k.segment_counts(keys, counts, np.array([1, 1, 0, -1], np.int64), np.array([5, 2, 2, 2], np.int64))
    np.testing.assert_array_equal(got, np.array([3.5, 0.0, 1.5, np.nan], np.float32))
