"""A synthetic interaction generator with both collaborative and content signal.

The hidden model:

- users belong to segments; a user's latent vector ``u`` is its segment's centre plus
  noise, so segment (exposed as ``occupation`` and the zip code's first digit, with an
  age band) predicts taste;
- items have a primary genre (and sometimes a second); an item's latent vector ``v`` is
  its genre prototype plus noise, and its release year follows its first factor, so
  genres and year predict the item's vector;
- item popularity follows a power law (Zipf with ``popularity_exponent``), user activity
  is log-normal (``activity_sigma``): a few users and items hold most interactions;
- each interaction picks, among ``n_choices`` popularity-drawn candidates, the one the
  user likes best (``u . v`` plus Gumbel noise), so *which* items a user touches carries
  collaborative signal, not only the ratings;
- ratings are ``3.0 + b_u + b_i + u.v + noise``, rounded and clipped to 1..5 stars.

Deterministic for a seed. 20M ratings take well under a minute and ~2 GB.
"""

from __future__ import annotations

import numpy as np

from engine.data.dataset import Dataset, FeatureTable, IdMap

_CHUNK = 1 << 20  # interactions scored per step: bounds the temporaries


def make_synthetic(
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_ratings: int = 100_000,
    n_factors: int = 8,
    n_genres: int = 12,
    n_segments: int = 8,
    popularity_exponent: float = 0.9,
    activity_sigma: float = 1.0,
    n_choices: int = 4,
    noise: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Generate a :class:`Dataset` of ``n_ratings`` distinct (user, item) ratings.

    Users get features ``age``, ``gender``, ``occupation`` and ``zip_code``; items get
    ``genres`` (multi-hot), ``year`` and titles. All arguments must be positive, and
    ``n_ratings`` at most half of ``n_users * n_items`` (so distinct pairs can be drawn).
    """
    for label, value in (
        ("n_users", n_users),
        ("n_items", n_items),
        ("n_ratings", n_ratings),
        ("n_factors", n_factors),
        ("n_genres", n_genres),
        ("n_segments", n_segments),
        ("n_choices", n_choices),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if n_ratings > n_users * n_items // 2:
        raise ValueError(
            f"n_ratings={n_ratings} is too dense for {n_users} users x {n_items} items "
            f"(at most {n_users * n_items // 2})"
        )
    rng = np.random.default_rng(seed)
    f = n_factors

    # --- users: segment centre + noise; features follow the segment.
    centres = rng.normal(0, 1, (n_segments, f)).astype(np.float32)
    segment = rng.integers(0, n_segments, n_users)
    U = (0.8 * centres[segment] + rng.normal(0, 0.6, (n_users, f))).astype(np.float32) / np.sqrt(f)
    user_bias = rng.normal(0, 0.3, n_users).astype(np.float32)
    age = np.clip(18 + 6 * segment + rng.normal(0, 8, n_users), 12, 80).round().astype(np.float32)
    gender = np.where(rng.random(n_users) < 0.5, "M", "F")
    occupation = np.array([f"segment-{s}" for s in range(n_segments)])[segment]
    zip_code = np.array([f"{s % 10}{z:04d}" for s, z in zip(segment, rng.integers(0, 10_000, n_users))])

    # --- items: genre prototype + noise; a second genre from affinity; year from factor 0.
    prototypes = rng.normal(0, 1, (n_genres, f)).astype(np.float32)
    primary = rng.integers(0, n_genres, n_items)
    V = (0.8 * prototypes[primary] + rng.normal(0, 0.6, (n_items, f))).astype(np.float32) / np.sqrt(f)
    affinity = V @ prototypes.T
    affinity[np.arange(n_items), primary] = -np.inf
    secondary = affinity.argmax(axis=1)
    genres = np.zeros((n_items, n_genres), np.uint8)
    genres[np.arange(n_items), primary] = 1
    has_second = rng.random(n_items) < 0.4
    genres[np.flatnonzero(has_second), secondary[has_second]] = 1
    year = np.clip(1985 + 25 * np.tanh(V[:, 0] * np.sqrt(f)) + rng.normal(0, 4, n_items), 1920, 2025).round()

    # --- popularity: a power law over a random order of the items. Ranks are drawn by
    # inverting the CDF of the continuous law on [1, n_items + 1) — O(1) a draw, where a
    # binary search in a 27k-entry CDF costs far more at 20M x n_choices draws.
    item_at_rank = rng.permutation(n_items).astype(np.int32)
    sampler = _PowerLawRanks(n_items, popularity_exponent)
    log_pop = np.empty(n_items)
    log_pop[item_at_rank] = np.log(sampler.probabilities())
    item_bias = (0.2 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9) + rng.normal(0, 0.3, n_items)).astype(
        np.float32
    )

    # --- user activity: log-normal weights; interactions are drawn in rounds until
    # n_ratings distinct pairs exist (popular items make repeats, which are dropped).
    activity = rng.lognormal(0, activity_sigma, n_users)
    activity /= activity.sum()
    keys = np.zeros(0, np.int64)
    new_share = 0.9  # share of draws that turn out new; re-estimated every round
    for _ in range(50):
        missing = n_ratings - len(keys)
        if missing <= 0:
            break
        n_draw = int(missing / max(new_share, 0.02) * 1.05) + 16
        users = np.repeat(np.arange(n_users, dtype=np.int32), rng.multinomial(n_draw, activity))
        items = _choose_items(rng, users, U, V, lambda n: item_at_rank[sampler.draw(rng, n)], n_choices)
        before = len(keys)
        keys = _sorted_unique(np.concatenate([keys, users.astype(np.int64) * n_items + items]))
        new_share = (len(keys) - before) / n_draw
    if len(keys) > n_ratings:
        keys = np.sort(rng.choice(keys, n_ratings, replace=False))
    users, items = (keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32)
    del keys

    ratings = np.empty(len(users), np.float32)
    for start in range(0, len(users), _CHUNK):
        u, i = users[start : start + _CHUNK], items[start : start + _CHUNK]
        z = 3.0 + user_bias[u] + item_bias[i] + np.einsum("nf,nf->n", U[u], V[i]) * 4.0
        z += rng.normal(0, noise, len(u)).astype(np.float32)
        ratings[start : start + _CHUNK] = np.clip(np.rint(z), 1, 5)
    start_time = rng.integers(946_684_800, 1_600_000_000, n_users)  # 2000 .. 2020
    timestamps = start_time[users] + rng.integers(0, 3 * 365 * 86_400, len(users))

    user_features = FeatureTable(
        {"age": age, "gender": gender.astype(str), "occupation": occupation, "zip_code": zip_code}
    )
    genre_labels = [f"genre-{g}" for g in range(n_genres)]
    item_features = FeatureTable({"genres": genres, "year": year.astype(np.float32)}, {"genres": genre_labels})
    titles = np.array([f"Item {i} ({int(y)})" for i, y in enumerate(year)])
    return Dataset(
        users,
        items,
        ratings,
        timestamps.astype(np.int64),
        IdMap(np.char.add("u", np.arange(n_users).astype(str)), "user"),
        IdMap(np.char.add("i", np.arange(n_items).astype(str)), "item"),
        user_features=user_features,
        item_features=item_features,
        item_titles=titles,
        name=f"synthetic(seed={seed})",
        drop_duplicates=False,
    )


class _PowerLawRanks:
    """Ranks ``0..n-1`` drawn with probability proportional to the mass of the
    continuous power law ``r^-a`` on ``[r + 1, r + 2)``."""

    def __init__(self, n: int, exponent: float):
        self.n, self.a = n, exponent

    def _cdf_inverse(self, u: np.ndarray) -> np.ndarray:
        if abs(self.a - 1.0) < 1e-9:
            return np.exp(u * np.log(self.n + 1.0))
        e = 1.0 - self.a
        return (1.0 + u * ((self.n + 1.0) ** e - 1.0)) ** (1.0 / e)

    def probabilities(self) -> np.ndarray:
        r = np.arange(1, self.n + 2, dtype=np.float64)
        if abs(self.a - 1.0) < 1e-9:
            cdf = np.log(r) / np.log(self.n + 1.0)
        else:
            e = 1.0 - self.a
            cdf = (r**e - 1.0) / ((self.n + 1.0) ** e - 1.0)
        return np.maximum(np.diff(cdf), 1e-300)

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        r = self._cdf_inverse(rng.random(shape)).astype(np.int64) - 1
        return np.clip(r, 0, self.n - 1)


def _choose_items(
    rng: np.random.Generator, users: np.ndarray, U: np.ndarray, V: np.ndarray, draw_items, n_choices: int
) -> np.ndarray:
    """For each entry of ``users``, the best-liked of ``n_choices`` popularity-drawn items
    (``draw_items(shape)`` draws item indices by popularity)."""
    items = np.empty(len(users), np.int32)
    for start in range(0, len(users), _CHUNK):
        u = users[start : start + _CHUNK]
        cand = draw_items((len(u), n_choices))
        taste = np.einsum("nf,ncf->nc", U[u], V[cand]) * 8.0
        taste += rng.gumbel(0, 1, taste.shape).astype(np.float32)
        items[start : start + _CHUNK] = cand[np.arange(len(u)), taste.argmax(axis=1)]
    return items


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort beats NumPy 2's hash-based ``unique`` here)."""
    a = np.sort(a)
    if len(a) == 0:
        return a
    return a[np.concatenate(([True], a[1:] != a[:-1]))]
