import numpy as np
import pytest
import scipy.sparse as sp

from engine.data import from_arrays
from engine.evaluation import metrics


def rel(rows: list[list[int]], n_items: int = 10) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), n_items))


def test_rmse_and_mae_hand_computed():
    assert metrics.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(np.sqrt(4 / 3))
    assert metrics.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.rmse([1, 2], [1])


# user 0: relevant {1, 3, 5}, recommended [1, 2, 3]  -> hits at ranks 0 and 2
# user 1: relevant {7},       recommended [0, 7, -1] -> hit at rank 1 (padding at 2)
# user 2: relevant {},        recommended [4, 5, 6]  -> left out of every mean
RECS = np.array([[1, 2, 3], [0, 7, -1], [4, 5, 6]])
RELEVANT = rel([[1, 3, 5], [7], []])


def test_hits():
    np.testing.assert_array_equal(metrics.hits_at_k(RECS, RELEVANT, 3), [[1, 0, 1], [0, 1, 0], [0, 0, 0]])


def test_precision_recall_hitrate_hand_computed():
    assert metrics.precision_at_k(RECS, RELEVANT, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    # recall: user0 2/min(3,3), user1 1/min(1,3)
    assert metrics.recall_at_k(RECS, RELEVANT, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.recall_at_k(RECS, RELEVANT, 1) == pytest.approx((1 / 1 + 0) / 2)
    assert metrics.hit_rate_at_k(RECS, RELEVANT, 1) == pytest.approx(0.5)


def test_ndcg_hand_computed():
    d = 1 / np.log2(np.arange(3) + 2)  # 1, 0.6309, 0.5
    user0 = (d[0] + d[2]) / (d[0] + d[1] + d[2])
    user1 = d[1] / d[0]
    assert metrics.ndcg_at_k(RECS, RELEVANT, 3) == pytest.approx((user0 + user1) / 2)


def test_map_hand_computed():
    user0 = (1 / 1 + 2 / 3) / 3
    user1 = (1 / 2) / 1
    assert metrics.map_at_k(RECS, RELEVANT, 3) == pytest.approx((user0 + user1) / 2)


def test_perfect_ranking_scores_one():
    recs = np.array([[3, 1, 5]])
    r = rel([[1, 3, 5]])
    for fn in (metrics.precision_at_k, metrics.recall_at_k, metrics.ndcg_at_k, metrics.map_at_k):
        assert fn(recs, r, 3) == pytest.approx(1.0)


def test_coverage_and_ranking_report():
    assert metrics.coverage(RECS, 10) == pytest.approx(8 / 10)  # items 0..7; the -1 pad is not an item
    report = metrics.ranking_metrics(RECS, RELEVANT, k=3)
    assert set(report) == {"precision@3", "recall@3", "ndcg@3", "map@3", "hit_rate@3", "coverage@3"}


def test_k_and_shape_validation():
    with pytest.raises(ValueError, match="k=4"):
        metrics.recall_at_k(RECS, RELEVANT, 4)
    with pytest.raises(ValueError, match="rows"):
        metrics.recall_at_k(RECS[:2], RELEVANT, 2)
    with pytest.raises(ValueError, match="no user has a relevant item"):
        metrics.recall_at_k(RECS, rel([[], [], []]), 2)


def test_ann_recall():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [4, 5, 6]])
    assert metrics.ann_recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.ann_recall_at_k(approx, exact, 1) == pytest.approx(0.5)


def test_relevant_matrix_thresholds_ratings():
    test = from_arrays(["u1", "u1", "u2"], ["a", "b", "a"], [5, 3, 4])
    m = metrics.relevant_matrix(test, min_rating=4)
    np.testing.assert_array_equal(m.toarray(), [[1, 0], [1, 0]])
