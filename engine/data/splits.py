"""Train/test splits. Every split returns datasets that share the full id maps and
features, so a model trained on ``train`` indexes ``test`` users and items directly.

- :func:`predefined_split`: the MovieLens 100K folds ``u1..u5`` (and ``ua``/``ub``);
- :func:`random_split`: a seeded random fraction of interactions (overall, or of each user's);
- :func:`temporal_split`: per user, the latest fraction of their interactions;
- :func:`leave_last_n`: per user, the ``n`` most recent interactions;
- :func:`item_cold_start_split`: a fraction of items held out with all their ratings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.dataset import Dataset


@dataclass
class Split:
    """A train/test pair. ``cold_items`` holds the held-out item indices of an
    item cold-start split (empty otherwise)."""

    train: Dataset
    test: Dataset
    cold_items: np.ndarray

    def __iter__(self):  # allows ``train, test = split`` in the common case
        return iter((self.train, self.test))


def _split(ds: Dataset, test_mask: np.ndarray, label: str, cold_items: np.ndarray | None = None) -> Split:
    return Split(
        ds.subset(~test_mask, name=f"{ds.name}:{label}:train"),
        ds.subset(test_mask, name=f"{ds.name}:{label}:test"),
        np.zeros(0, np.int64) if cold_items is None else cold_items,
    )


def predefined_split(directory: str | os.PathLike, fold: str | int = 1) -> Split:
    """A MovieLens 100K predefined fold: ``fold`` 1..5 or ``"a"``/``"b"`` selects
    ``u{fold}.base`` / ``u{fold}.test``."""
    from engine.data.movielens import load_ml100k, read_ml100k_ratings

    d = Path(directory)
    if str(fold) not in ("1", "2", "3", "4", "5", "a", "b"):
        raise ValueError(f"fold must be 1..5, 'a' or 'b', got {fold!r}")
    full = load_ml100k(d)
    parts = []
    for suffix in ("base", "test"):
        inter = read_ml100k_ratings(d / f"u{fold}.{suffix}")
        users = full.users.indices(inter.user_ids)[inter.user_codes]
        items = full.items.indices(inter.item_ids)[inter.item_codes]
        parts.append(
            Dataset(
                users,
                items,
                inter.ratings,
                inter.timestamps,
                full.users,
                full.items,
                full.user_features,
                full.item_features,
                full.item_titles,
                name=f"ml-100k:u{fold}.{suffix}",
            )
        )
    return Split(parts[0], parts[1], np.zeros(0, np.int64))


def random_split(ds: Dataset, test_ratio: float = 0.2, seed: int = 0, per_user: bool = False) -> Split:
    """Interactions go to test at random, seeded: exactly ``test_ratio`` of them
    (rounded), or with ``per_user`` that share of each user's (rounded down, so a user
    with few interactions may keep them all in train)."""
    if not 0.0 < test_ratio < 1.0:
        raise ValueError(f"test_ratio must be in (0, 1), got {test_ratio}")
    rng = np.random.default_rng(seed)
    if per_user:
        # A random rank within each user: the first floor(ratio x count) ranks are test.
        # The ranks come from a seeded hash of each (user, item) pair, so that a user's
        # split depends on their interactions alone (a rank of a distributed run holding
        # some users splits them as the whole data's split does).
        order = np.lexsort((_pair_keys(ds, seed), ds.user_idx))
        return _split(ds, _first_per_user(ds, order, test_ratio), f"random{test_ratio}")
    n_test = int(round(ds.n_ratings * test_ratio))
    mask = np.zeros(ds.n_ratings, bool)
    mask[rng.choice(ds.n_ratings, n_test, replace=False)] = True
    return _split(ds, mask, f"random{test_ratio}")


def _pair_keys(ds: Dataset, seed: int) -> np.ndarray:
    """``[n_ratings]`` uint64: a seeded hash of each interaction's (user, item) pair
    (splitmix64's finaliser), uniform and independent of the other interactions."""
    x = ds.user_idx.astype(np.uint64) * np.uint64(ds.n_items) + ds.item_idx.astype(np.uint64)
    x ^= np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def temporal_split(ds: Dataset, test_fraction: float = 0.2) -> Split:
    """Per user, the latest ``test_fraction`` of their interactions (by timestamp, ties
    by file order; rounded down, so a user with fewer than ``1 / test_fraction``
    interactions stays in train): what a deployed model meets, the future of each user."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    # Latest first within each user.
    order = np.lexsort((-np.arange(ds.n_ratings), -ds.timestamps, ds.user_idx))
    return _split(ds, _first_per_user(ds, order, test_fraction), f"temporal{test_fraction}")


def _first_per_user(ds: Dataset, order: np.ndarray, fraction: float) -> np.ndarray:
    """A test mask holding, for each user, the first ``floor(fraction x count)`` of
    their interactions in ``order`` (which lists interactions grouped by user)."""
    counts = ds.user_counts()
    users_sorted = ds.user_idx[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(ds.n_ratings) - starts[users_sorted]
    mask = np.zeros(ds.n_ratings, bool)
    mask[order] = rank < np.floor(counts[users_sorted] * fraction + 1e-9)
    return mask


def leave_last_n(ds: Dataset, n: int = 1) -> Split:
    """Per user, the ``n`` latest interactions (by timestamp, ties by file order) go to
    test. Users with ``n`` or fewer interactions stay entirely in train."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    order = np.lexsort((np.arange(ds.n_ratings), ds.timestamps, ds.user_idx))
    counts = ds.user_counts()
    users_sorted = ds.user_idx[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(ds.n_ratings) - starts[users_sorted]  # rank within the user, oldest first
    from_end = counts[users_sorted] - position
    mask = np.zeros(ds.n_ratings, bool)
    mask[order] = (from_end <= n) & (counts[users_sorted] > n)
    return _split(ds, mask, f"last{n}")


def item_cold_start_split(ds: Dataset, item_fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out ``item_fraction`` of the items that have interactions, with all their
    ratings; ``Split.cold_items`` lists them (sorted dense indices)."""
    if not 0.0 < item_fraction < 1.0:
        raise ValueError(f"item_fraction must be in (0, 1), got {item_fraction}")
    rng = np.random.default_rng(seed)
    rated = np.flatnonzero(ds.item_counts() > 0)
    cold = np.sort(rng.choice(rated, int(round(len(rated) * item_fraction)), replace=False))
    mask = np.isin(ds.item_idx, cold)
    return _split(ds, mask, f"coldItems{item_fraction}", cold_items=cold.astype(np.int64))
