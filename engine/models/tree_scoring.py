"""Scoring a LightGBM model's trees in compiled code: the learned ranker's serving path.

LightGBM's own ``Booster.predict`` costs tens of microseconds per call before the first
tree is walked (argument checks, a C API round trip), more than the ranker's whole
budget for a lone request's few dozen candidates. :class:`CompiledTrees` flattens the
model's trees (``Booster.dump_model()``) into arrays and walks them with a numba kernel
that follows LightGBM's numerical decision rule exactly — NaN and zero handling by each
split's ``missing_type`` and ``default_left`` — summing leaf values in tree order in
float64, so its scores equal ``Booster.predict``'s (a test checks, NaNs included).
Categorical splits are not supported (the ranker's features are all numerical).
"""

from __future__ import annotations

import numba
import numpy as np

MISSING_NONE, MISSING_ZERO, MISSING_NAN = 0, 1, 2  # LightGBM's missing_type of a split
_MISSING = {"None": MISSING_NONE, "Zero": MISSING_ZERO, "NaN": MISSING_NAN}
ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold: |x| below it is zero


class CompiledTrees:
    """The trees of a LightGBM booster as flat arrays, scored by :func:`_score_rows`."""

    def __init__(self, booster):
        features, thresholds, lefts, rights, default_left, missing = [], [], [], [], [], []
        leaves: list[float] = []
        node_start, leaf_start = [0], [0]
        for tree in booster.dump_model()["tree_info"]:
            root = tree["tree_structure"]
            if "leaf_value" in root and "split_feature" not in root:  # a tree of one leaf
                leaves.append(float(root["leaf_value"]))
            else:
                nodes, tree_leaves = _flatten(root)
                for node in nodes:
                    if node["decision_type"] != "<=":
                        raise ValueError(f"unsupported split {node['decision_type']!r} (categorical features?)")
                    features.append(node["split_feature"])
                    thresholds.append(node["threshold"])
                    lefts.append(node["left"])
                    rights.append(node["right"])
                    default_left.append(node["default_left"])
                    missing.append(_MISSING[node["missing_type"]])
                leaves.extend(tree_leaves)
            node_start.append(len(features))
            leaf_start.append(len(leaves))
        self.n_trees = len(node_start) - 1
        self.node_start = np.array(node_start, np.int64)
        self.leaf_start = np.array(leaf_start, np.int64)
        self.feature = np.array(features, np.int64)
        self.threshold = np.array(thresholds, np.float64)
        left, right = np.array(lefts, np.int64), np.array(rights, np.int64)
        self.leaf_value = np.array(leaves, np.float64)
        default_right = ~np.array(default_left, np.bool_)
        kind = np.array(missing, np.int8)
        # LightGBM's rule for missing values, decided here once per node: a NaN goes the
        # default way on "NaN" splits, and is read as 0.0 elsewhere (which on "Zero" splits
        # is missing too, so the default way again); on "Zero" splits any |x| <= 1e-35 goes
        # the default way. The walk then picks a child by arithmetic (_score_rows).
        self.children = np.stack([left, right], axis=1).ravel()
        self.nan_right = np.where(kind == MISSING_NONE, 0.0 > self.threshold, default_right).astype(np.int64)
        self.zero_is_missing = kind == MISSING_ZERO
        self.zero_right = default_right.astype(np.int64)
        self.depth = np.array([_depth(left, right, a, b) for a, b in zip(node_start[:-1], node_start[1:])])

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """``[n]`` float64 raw scores of feature rows ``[n, n_features]``."""
        out = np.empty(len(rows), np.float64)
        _score_rows(
            np.ascontiguousarray(rows, np.float32),
            self.node_start,
            self.leaf_start,
            self.feature,
            self.threshold,
            self.children,
            self.nan_right,
            self.zero_is_missing,
            self.zero_right,
            self.leaf_value,
            self.depth,
            np.empty(len(rows), np.int64),
            out,
        )
        return out


def _flatten(root: dict) -> tuple[list[dict], list[float]]:
    """A dumped tree's internal nodes in preorder and its leaf values by leaf index;
    each node's children as node positions (>= 0) or ``-(leaf index) - 1``."""
    nodes: list[dict] = []
    leaves: dict[int, float] = {}

    def visit(node: dict) -> int:
        if "leaf_index" in node:
            leaves[node["leaf_index"]] = float(node["leaf_value"])
            return -node["leaf_index"] - 1
        at = len(nodes)
        entry = dict(node)
        nodes.append(entry)
        entry["left"] = visit(node["left_child"])
        entry["right"] = visit(node["right_child"])
        return at

    visit(root)
    return nodes, [leaves[i] for i in range(len(leaves))]


def _depth(left: np.ndarray, right: np.ndarray, start: int, stop: int) -> int:
    """The number of splits on the longest path of the tree at nodes ``start:stop``."""
    if stop == start:
        return 0
    deepest, stack = 0, [(0, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in (left[start + node], right[start + node]):
            if child >= 0:
                stack.append((int(child), depth + 1))
    return deepest


@numba.njit(cache=True, nogil=True)
def _score_rows(
    rows, node_start, leaf_start, feature, threshold, children, nan_right, zero_is_missing, zero_right, leaf_value,
    depth, at, out,
):  # fmt: skip
    """Each tree takes every row one level down at a time (independent steps the
    processor overlaps), each step picking a child by arithmetic; the sums are in tree
    order per row, as LightGBM's."""
    out[:] = 0.0
    n = rows.shape[0]
    for t in range(len(node_start) - 1):
        base = node_start[t]
        at[:] = 0 if node_start[t + 1] > base else -1  # a one-leaf tree is leaf 0
        for _ in range(depth[t]):
            for r in range(n):
                node = at[r]
                if node >= 0:
                    j = base + node
                    x = rows[r, feature[j]]
                    if x != x:
                        right = nan_right[j]
                    elif zero_is_missing[j] and abs(x) <= ZERO_THRESHOLD:
                        right = zero_right[j]
                    else:
                        right = np.int64(np.float64(x) > threshold[j])
                    at[r] = children[2 * j + right]
        for r in range(n):
            out[r] += leaf_value[leaf_start[t] - at[r] - 1]
