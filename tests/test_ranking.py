"""Top-k selection against a stable sort, the reference for "best first, ties by lower
index": the compiled small-k pass, the sort and the partition paths, and per row."""

import numpy as np
import pytest

from engine.topk import top_k_desc, top_k_per_row


def _scores(rng, n: int, kind: str) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        return rng.integers(0, 4, n).astype(np.float32)
    if kind == "ascending":  # the small-k pass's worst case: every score enters the buffer
        return np.sort(rng.standard_normal(n)).astype(np.float32)
    if kind == "signed-zeros":
        s = np.zeros(n, np.float32)
        s[::3] = -0.0
        s[::7] = 1.0
        return s
    s = rng.standard_normal(n).astype(np.float32)  # "nan": NaN ranks last
    s[rng.integers(n, size=int(rng.choice([1, 3, max(1, n // 10)])))] = np.nan
    return s


@pytest.mark.parametrize("kind", ["normal", "ties", "ascending", "signed-zeros", "nan"])
def test_top_k_desc_equals_a_stable_sort(kind):
    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (5, 10), (500, 10), (500, 64), (500, 65), (3000, 7), (6000, 10), (6000, 100)]:
        for _ in range(20):
            s = _scores(rng, n, kind)
            want = np.argsort(-s, kind="stable")[: min(k, n)]
            got = top_k_desc(s, k)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)


def test_top_k_per_row_equals_each_rows_stable_sort():
    rng = np.random.default_rng(1)
    rows = np.sort(rng.integers(0, 6, 400))
    scores = rng.integers(0, 5, 400).astype(np.float32)  # many ties
    got = top_k_per_row(rows, scores, 7, 6)
    want = np.concatenate(
        [np.flatnonzero(rows == r)[np.argsort(-scores[rows == r], kind="stable")[:7]] for r in range(6)]
    )
    np.testing.assert_array_equal(got, want)
    assert top_k_desc(np.zeros(0, np.float32), 5).tolist() == [] and top_k_desc(scores, 0).tolist() == []
