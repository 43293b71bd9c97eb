"""The Dataset: interactions, id maps, optional feature tables, sparse views.

Orientation is fixed and said in names: ``user_items()`` is ``[n_users, n_items]``,
``item_users()`` is ``[n_items, n_users]``. Interactions are parallel arrays indexed by
dense indices; external ids (always strings) live only in the two :class:`IdMap` s.
Nothing here ever materialises a dense users x items matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from engine.errors import UnknownIdError, shorten

# A rating at least this high is a like (explicit data); see liked_mask.
LIKE_RATING = 4.0


def liked_mask(ratings: np.ndarray, implicit: bool, min_rating: float = LIKE_RATING) -> np.ndarray:
    """Which interactions are likes: every one for implicit data (an interaction is the
    signal), else the ratings of at least ``min_rating``. The one rule the index builder
    (each user's recent likes) and the engine (likes given with a request) share."""
    ratings = np.asarray(ratings, np.float64)
    return np.ones(len(ratings), bool) if implicit else ratings >= min_rating


class IdMap:
    """Bidirectional map between external ids (strings) and dense indices ``0..n-1``.

    Args:
        ids: the external ids in index order; must be unique.
    """

    def __init__(self, ids: Sequence[str] | np.ndarray, kind: str = "id"):
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"{kind} ids must be one-dimensional, got shape {ids.shape}")
        self.ids: np.ndarray = ids.astype(str)  # [n] unicode, saves without pickle
        self.kind = kind
        self._index: dict[str, int] | None = None  # built on first lookup
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError(f"{kind} ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self.ids, other.ids)

    def __contains__(self, external_id: object) -> bool:
        return str(external_id) in self._lookup()

    def _lookup(self) -> dict[str, int]:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.ids.tolist())}
        return self._index

    def index(self, external_id: object) -> int:
        """Dense index of one external id; raises :class:`UnknownIdError` if absent."""
        try:
            return self._lookup()[str(external_id)]
        except KeyError:
            raise UnknownIdError(f"unknown {self.kind} id {shorten(external_id)}") from None

    def get(self, external_id: object) -> int | None:
        """Dense index of one external id, or None if absent."""
        return self._lookup().get(str(external_id))

    def indices(self, external_ids: Iterable[object]) -> np.ndarray:
        """Dense indices ``[n]`` (int64) of many external ids; raises on the first unknown one."""
        lookup = self._lookup()
        out = []
        for e in external_ids:
            try:
                out.append(lookup[str(e)])
            except KeyError:
                raise UnknownIdError(f"unknown {self.kind} id {shorten(e)}") from None
        return np.asarray(out, dtype=np.int64)

    def indices_or_missing(self, external_ids: Iterable[object]) -> np.ndarray:
        """Dense indices ``[n]`` (int64) of many external ids, ``-1`` for unknown ones (or None)."""
        lookup = self._lookup()
        return np.fromiter((-1 if e is None else lookup.get(str(e), -1) for e in external_ids), np.int64)

    def external(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """External ids ``[n]`` (unicode) of dense indices."""
        ids = self.ids[np.asarray(indices, dtype=np.int64)]
        return ids if ids.dtype.kind == "U" else ids.astype(str)

    def extended(self, new_ids: Sequence[str]) -> IdMap:
        """A new map with ``new_ids`` (strings, not yet in this map) appended; this one is
        unchanged. The ids are then held as Python strings (an object array), so that one
        long id costs its own length, not that length for every id as a fixed-width
        unicode array would; :meth:`external` still returns unicode arrays."""
        grown = IdMap.__new__(IdMap)
        grown.ids = np.array(self.ids.tolist() + list(new_ids), object)
        grown.kind = self.kind
        lookup = dict(self._lookup())
        lookup.update((s, len(self.ids) + k) for k, s in enumerate(new_ids))
        grown._index = lookup
        return grown


@dataclass
class FeatureTable:
    """Side features of users or items, one row per dense index.

    ``columns`` maps a column name to an array of length ``n_rows``: float32 for
    numeric columns (NaN = missing), unicode strings for categorical ones ("" = missing),
    or a 2-D ``[n_rows, n_labels]`` uint8 array for multi-hot columns (genres), whose
    label names are in ``labels[name]``.
    """

    columns: dict[str, np.ndarray]
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"feature columns differ in length: {lengths}")
        for name, col in self.columns.items():
            if col.ndim == 2 and len(self.labels.get(name, ())) != col.shape[1]:
                raise ValueError(f"multi-hot column {name!r} needs {col.shape[1]} labels")

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def take(self, rows: np.ndarray) -> FeatureTable:
        """The table restricted to ``rows`` (dense indices), in that order."""
        return FeatureTable({k: v[rows] for k, v in self.columns.items()}, dict(self.labels))


class Dataset:
    """Interactions between users and items, with id maps and optional features.

    Args:
        user_idx, item_idx: ``[n_ratings]`` dense indices into ``users`` / ``items``.
        ratings: ``[n_ratings]`` float32 (1.0 for implicit data).
        timestamps: ``[n_ratings]`` int64 seconds since the epoch (0 when unknown).
        users, items: id maps; they may hold ids with no interactions (a test split,
            cold items), which is why they are passed rather than derived.
        user_features, item_features: optional tables with one row per dense index.
        item_titles: optional ``[n_items]`` strings.
        name: a label for reports.
        drop_duplicates: when True (default) a (user, item) pair seen more than once
            keeps only its latest interaction (by timestamp, then file order).
    """

    def __init__(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        ratings: np.ndarray,
        timestamps: np.ndarray,
        users: IdMap,
        items: IdMap,
        user_features: FeatureTable | None = None,
        item_features: FeatureTable | None = None,
        item_titles: np.ndarray | None = None,
        name: str = "dataset",
        drop_duplicates: bool = True,
    ):
        self.user_idx = np.ascontiguousarray(user_idx, dtype=np.int32)
        self.item_idx = np.ascontiguousarray(item_idx, dtype=np.int32)
        self.ratings = np.ascontiguousarray(ratings, dtype=np.float32)
        self.timestamps = np.ascontiguousarray(timestamps, dtype=np.int64)
        self.users, self.items = users, items
        self.user_features, self.item_features = user_features, item_features
        self.item_titles = None if item_titles is None else np.asarray(item_titles).astype(str)
        self.name = name
        # Bytes of the bundle root's feedback log merged into these interactions
        # (engine.data.feedback.with_feedback): the bundle built from them replays the rest.
        self.feedback_offset = 0
        # Some parts of a sharded directory (engine.data.shards.read_shards): the whole
        # data's name, fingerprint and size, which a model trained on every rank's parts
        # was trained on. None for a whole dataset.
        self.shard_of: dict | None = None
        self._validate()
        if drop_duplicates:
            self._drop_duplicate_pairs()
        self._csr_cache: dict[str, sp.csr_matrix] = {}

    def _validate(self) -> None:
        n = len(self.user_idx)
        for label, arr in (("item_idx", self.item_idx), ("ratings", self.ratings), ("timestamps", self.timestamps)):
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"{label} has shape {arr.shape}, expected ({n},) like user_idx")
        if n:
            if self.user_idx.min() < 0 or self.user_idx.max() >= len(self.users):
                raise ValueError("user_idx out of range of the user id map")
            if self.item_idx.min() < 0 or self.item_idx.max() >= len(self.items):
                raise ValueError("item_idx out of range of the item id map")
            if not np.isfinite(self.ratings).all():
                raise ValueError("ratings contain NaN or infinite values")
        if self.user_features is not None and self.user_features.n_rows != len(self.users):
            raise ValueError("user_features must have one row per user")
        if self.item_features is not None and self.item_features.n_rows != len(self.items):
            raise ValueError("item_features must have one row per item")
        if self.item_titles is not None and len(self.item_titles) != len(self.items):
            raise ValueError("item_titles must have one entry per item")

    def _drop_duplicate_pairs(self) -> None:
        key = self.user_idx.astype(np.int64) * len(self.items) + self.item_idx
        # Stable sort by timestamp so that, among equal keys, the latest comes last;
        # np.unique on the reversed order then keeps the last occurrence.
        order = np.argsort(self.timestamps, kind="stable")
        rev = order[::-1]
        _, first_in_rev = np.unique(key[rev], return_index=True)
        if len(first_in_rev) == len(key):
            return
        keep = np.sort(rev[first_in_rev])
        self.user_idx, self.item_idx = self.user_idx[keep], self.item_idx[keep]
        self.ratings, self.timestamps = self.ratings[keep], self.timestamps[keep]

    # ------------------------------------------------------------------ sizes
    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_ratings(self) -> int:
        return len(self.ratings)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, n_users={self.n_users}, n_items={self.n_items}, n_ratings={self.n_ratings})"

    def fingerprint(self) -> str:
        """sha256 of the interactions and id maps: identifies this exact data (what a
        bundle was built from, what a model was trained on)."""
        import hashlib

        h = hashlib.sha256()
        for arr in (self.user_idx, self.item_idx, self.ratings, self.timestamps):
            h.update(np.ascontiguousarray(arr).tobytes())
        for ids in (self.users.ids, self.items.ids):
            h.update("\x00".join(ids.tolist()).encode())
        return h.hexdigest()

    @property
    def implicit(self) -> bool:
        """Implicit feedback: every interaction has the same value (no rating scale)."""
        return bool(self.n_ratings) and float(self.ratings.min()) == float(self.ratings.max())

    @property
    def has_timestamps(self) -> bool:
        """Whether the interactions carry times (more than one distinct value): what
        decides between temporal and random held-out parts."""
        return bool(self.n_ratings) and int(self.timestamps.min()) != int(self.timestamps.max())

    def liked(self, min_rating: float = LIKE_RATING) -> np.ndarray:
        """``[n_ratings]`` bool: the interactions that are likes (see :func:`liked_mask`)."""
        return liked_mask(self.ratings, self.implicit, min_rating)

    # ----------------------------------------------------------- sparse views
    def user_items(self) -> sp.csr_matrix:
        """Ratings as CSR ``[n_users, n_items]`` (float32). Cached."""
        if "ui" not in self._csr_cache:
            self._csr_cache["ui"] = self._csr(self.user_idx, self.item_idx, self.n_users, self.n_items)
        return self._csr_cache["ui"]

    def item_users(self) -> sp.csr_matrix:
        """Ratings as CSR ``[n_items, n_users]`` (float32). Cached."""
        if "iu" not in self._csr_cache:
            self._csr_cache["iu"] = self._csr(self.item_idx, self.user_idx, self.n_items, self.n_users)
        return self._csr_cache["iu"]

    def _csr(self, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> sp.csr_matrix:
        m = sp.csr_matrix((self.ratings, (rows, cols)), shape=(n_rows, n_cols), dtype=np.float32)
        m.sort_indices()
        return m

    def user_counts(self) -> np.ndarray:
        """Number of interactions of each user ``[n_users]``."""
        return np.bincount(self.user_idx, minlength=self.n_users)

    def item_counts(self) -> np.ndarray:
        """Number of interactions of each item ``[n_items]``."""
        return np.bincount(self.item_idx, minlength=self.n_items)

    # ---------------------------------------------------------------- subsets
    def subset(self, mask_or_rows: np.ndarray, name: str | None = None) -> Dataset:
        """The interactions selected by a boolean mask or row indices, with the same
        id maps and features (so indices stay aligned across splits)."""
        sel = np.asarray(mask_or_rows)
        return Dataset(
            self.user_idx[sel],
            self.item_idx[sel],
            self.ratings[sel],
            self.timestamps[sel],
            self.users,
            self.items,
            self.user_features,
            self.item_features,
            self.item_titles,
            name=name or self.name,
            drop_duplicates=False,
        )

    # ----------------------------------------------------------- description
    def title(self, item_index: int) -> str:
        """Readable title of an item (its external id when the dataset has no titles)."""
        if self.item_titles is not None and self.item_titles[item_index]:
            return str(self.item_titles[item_index])
        return str(self.items.ids[item_index])

    def describe(self, top: int = 10) -> dict:
        """Summary statistics as a JSON-ready dict.

        Sparsity is ``1 - n_ratings / (n_users * n_items)``, computed from the counts.
        """
        users_c, items_c = self.user_counts(), self.item_counts()
        distinct = np.unique(self.ratings)
        out = {
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_ratings": self.n_ratings,
            "sparsity": 1.0 - self.n_ratings / max(1, self.n_users * self.n_items),
            "rating_min": float(distinct[0]) if len(distinct) else None,
            "rating_max": float(distinct[-1]) if len(distinct) else None,
            "rating_mean": float(self.ratings.mean()) if self.n_ratings else None,
            # The scale is the set of distinct values when it is small (stars), else a range.
            "rating_values": [float(v) for v in distinct] if len(distinct) <= 20 else None,
            "implicit": self.implicit,
            "ratings_per_user": _spread(users_c),
            "ratings_per_item": _spread(items_c),
            "timestamp_range": ([int(self.timestamps.min()), int(self.timestamps.max())] if self.n_ratings else None),
            "user_feature_columns": sorted(self.user_features.columns) if self.user_features else [],
            "item_feature_columns": sorted(self.item_features.columns) if self.item_features else [],
        }
        order = np.argsort(-items_c, kind="stable")[:top]
        sums = np.bincount(self.item_idx, weights=self.ratings, minlength=self.n_items)
        out["top_items"] = [
            {
                "item_id": str(self.items.ids[i]),
                "title": self.title(i),
                "n_ratings": int(items_c[i]),
                "mean_rating": float(sums[i] / items_c[i]) if items_c[i] else None,
            }
            for i in order
            if items_c[i] > 0
        ]
        return out


def _spread(counts: np.ndarray) -> dict:
    if len(counts) == 0:
        return {"min": 0, "median": 0.0, "max": 0, "mean": 0.0}
    return {
        "min": int(counts.min()),
        "median": float(np.median(counts)),
        "max": int(counts.max()),
        "mean": float(counts.mean()),
    }


def factorize(external_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map external ids to dense codes.

    Returns ``(codes [n] int32, uniques [n_unique] str)``. Uniques are sorted
    numerically when every id is an integer (so MovieLens user "2" comes before "10"),
    lexicographically otherwise.
    """
    values = np.asarray(external_ids).astype(str)
    uniques, codes = np.unique(values, return_inverse=True)
    try:
        numeric = uniques.astype(np.int64)
    except (ValueError, OverflowError):
        return codes.astype(np.int32), uniques
    order = np.argsort(numeric, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[codes].astype(np.int32), uniques[order]


def from_arrays(
    users: Sequence[object] | np.ndarray,
    items: Sequence[object] | np.ndarray,
    ratings: Sequence[float] | np.ndarray | None = None,
    timestamps: Sequence[int] | np.ndarray | None = None,
    name: str = "arrays",
) -> Dataset:
    """Build a :class:`Dataset` from parallel sequences of external ids.

    Ratings default to 1.0 (implicit data), timestamps to 0. Ids are converted to
    strings; a repeated (user, item) pair keeps its latest interaction.
    """
    users = np.asarray(users)
    items = np.asarray(items)
    if users.ndim != 1 or items.ndim != 1 or len(users) != len(items):
        raise ValueError(f"users and items must be 1-D and equally long, got {users.shape} and {items.shape}")
    n = len(users)
    r = np.ones(n, np.float32) if ratings is None else np.asarray(ratings, dtype=np.float32)
    t = np.zeros(n, np.int64) if timestamps is None else np.asarray(timestamps, dtype=np.int64)
    if r.shape != (n,) or t.shape != (n,):
        raise ValueError(f"ratings and timestamps must have shape ({n},), got {r.shape} and {t.shape}")
    u_codes, u_ids = factorize(users)
    i_codes, i_ids = factorize(items)
    return Dataset(u_codes, i_codes, r, t, IdMap(u_ids, "user"), IdMap(i_ids, "item"), name=name)
