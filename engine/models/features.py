"""Feature pipelines for the two-tower model, fitted on training data only.

A :class:`FeaturePipeline` turns a :class:`~engine.data.FeatureTable` (or raw feature
dicts, for users and items never seen) plus training-rating statistics into a dense
float32 matrix. Everything it learned — vocabularies, means, scales, statistics — is
plain JSON and arrays, so it saves without pickle.

Column kinds, chosen from the data:

- numeric (float32 columns): standardised with the training mean/std; a missing value
  becomes 0 and sets a ``<name>_missing`` flag;
- categorical (string columns): one-hot over the training vocabulary (categories seen at
  least ``min_count`` times), plus an ``<unknown>`` column for anything else or missing;
- ``zip_code``: reduced to its region (first character) and one-hot encoded;
- multi-hot (2-D columns, e.g. genres): copied as is;
- the rating history: for users, the average (centred on the global mean) and
  ``log1p`` count of their training ratings overall and per genre, as the mission's
  reference does; for items, their average (centred) and ``log1p`` count. Users and items
  with no training ratings get zeros: "no history".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from engine.data import Dataset, FeatureTable
from engine.data.attributes import label_flags
from engine.errors import InvalidRequest, shorten
from engine.models import distributed

UNKNOWN = "<unknown>"


@dataclass
class ColumnEncoder:
    """How one raw column becomes output columns (``kind``: numeric, onehot, region, multihot)."""

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    vocab: list[str] = field(default_factory=list)
    width: int = 0  # multihot: number of labels (their names in vocab, where the data named them)

    @property
    def output_names(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name, f"{self.name}_missing"]
        if self.kind in ("onehot", "region"):
            return [f"{self.name}={v}" for v in self.vocab] + [f"{self.name}={UNKNOWN}"]
        if len(self.vocab) == self.width:
            return [f"{self.name}={label}" for label in self.vocab]
        return [f"{self.name}[{k}]" for k in range(self.width)]

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values``: the raw column ``[n]`` (or ``[n, width]`` for multihot)."""
        n = len(values)
        if self.kind == "numeric":
            v = np.asarray(values, np.float64)
            missing = ~np.isfinite(v)
            z = np.where(missing, 0.0, (np.where(missing, self.mean, v) - self.mean) / self.std)
            return np.stack([z, missing.astype(np.float64)], axis=1).astype(np.float32)
        if self.kind in ("onehot", "region"):
            text = np.asarray(values).astype(str)
            if self.kind == "region":
                text = zip_regions(text)
            lookup = {v: k for k, v in enumerate(self.vocab)}
            cols = np.array(
                [lookup.get(s, len(self.vocab)) if s else len(self.vocab) for s in text.tolist()], dtype=np.int64
            )
            out = np.zeros((n, len(self.vocab) + 1), np.float32)
            out[np.arange(n), cols] = 1.0
            return out
        flags = np.asarray(values, np.float32).reshape(n, -1)
        if flags.shape[1] != self.width:
            raise InvalidRequest(f"feature {self.name!r} has {flags.shape[1]} values, expected {self.width}")
        return flags

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "mean": self.mean,
            "std": self.std,
            "vocab": self.vocab,
            "width": self.width,
        }


def zip_regions(zip_codes: np.ndarray) -> np.ndarray:
    """The region of each zip code: its first character, upper-cased ("" when missing)."""
    return np.array([z.strip()[:1].upper() for z in np.asarray(zip_codes).astype(str).tolist()], dtype=str)


def segment_labels(key: str, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Each user's segment label ``[n]`` for a segment key ("" when unknown), from raw
    user feature columns. Keys: ``zip_region`` (the zip code's first character),
    ``age_band`` (decade of age, e.g. ``"20s"``) or any one-dimensional column
    (e.g. ``occupation``)."""
    if key == "zip_region" and "zip_code" in columns:
        return zip_regions(columns["zip_code"])
    if key == "age_band" and "age" in columns:
        age = np.asarray(columns["age"], np.float64)
        return np.array([f"{int(a // 10 * 10)}s" if np.isfinite(a) else "" for a in age.tolist()], dtype=str)
    if key in columns and np.asarray(columns[key]).ndim == 1:
        return np.asarray(columns[key]).astype(str)
    return np.full(n, "")


def fit_column(
    name: str, values: np.ndarray, rows: np.ndarray, min_count: int = 1, labels: list[str] | None = None
) -> ColumnEncoder:
    """Fit an encoder for one column on the training ``rows`` of ``values`` (``labels``:
    the names of a multi-hot column's flags)."""
    values = np.asarray(values)
    train = values[rows] if len(rows) else values[:0]
    if values.ndim == 2:
        return ColumnEncoder(name, "multihot", width=values.shape[1], vocab=list(labels or []))
    if values.dtype.kind == "f":
        finite = train[np.isfinite(train)]
        mean = float(finite.mean()) if len(finite) else 0.0
        std = float(finite.std()) if len(finite) > 1 else 1.0
        return ColumnEncoder(name, "numeric", mean=mean, std=std if std > 1e-6 else 1.0)
    text = train.astype(str)
    kind = "onehot"
    if name == "zip_code":
        kind = "region"
        text = zip_regions(text)
    uniques, counts = np.unique(text[text != ""], return_counts=True)
    return ColumnEncoder(name, kind, vocab=[str(u) for u, c in zip(uniques, counts) if c >= min_count])


class FeaturePipeline:
    """Encodes one side (users or items): raw feature columns plus rating history.

    Build with :func:`fit_user_pipeline` / :func:`fit_item_pipeline`.
    """

    def __init__(self, side: str, encoders: list[ColumnEncoder], history: np.ndarray, history_names: list[str]):
        self.side = side
        self.encoders = encoders
        self.history = np.asarray(history, np.float32)  # [n_entities, n_history] per known entity
        self.history_names = list(history_names)

    @property
    def output_names(self) -> list[str]:
        return [n for e in self.encoders for n in e.output_names] + self.history_names

    @property
    def dim(self) -> int:
        return len(self.output_names)

    def transform_table(self, table: FeatureTable | None, rows: np.ndarray) -> np.ndarray:
        """Feature matrix ``[len(rows), dim]`` for known entities (dense indices)."""
        rows = np.asarray(rows, np.int64)
        return np.concatenate([self.transform_attributes(table, rows), self.history[rows]], axis=1)

    def transform_attributes(self, table: FeatureTable | None, rows: np.ndarray) -> np.ndarray:
        """The table's columns alone, encoded (no rating history): ``[len(rows), n]``."""
        rows = np.asarray(rows, np.int64)
        parts = [e.encode(_column(table, e, rows)) for e in self.encoders]
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(rows), 0), np.float32)

    def transform_dicts(self, rows: Iterable[Mapping[str, object]]) -> np.ndarray:
        """Feature matrix for entities given as raw feature dicts (cold start). Missing
        keys are missing values; unknown keys are errors; the history is empty."""
        rows = list(rows)
        known = {e.name for e in self.encoders}
        for r in rows:
            unknown = set(r) - known
            if unknown:
                raise InvalidRequest(
                    f"unknown {self.side} feature(s) {shorten(sorted(unknown))}; known: {sorted(known)}"
                )
        parts = []
        for e in self.encoders:
            if e.kind == "multihot":
                col = np.array([_as_flags(e, r.get(e.name)) for r in rows], np.float32).reshape(len(rows), e.width)
            elif e.kind == "numeric":
                col = np.array([_as_float(e.name, r.get(e.name)) for r in rows], np.float64)
                z = np.abs(col - e.mean) / e.std
                if (z > MAX_STANDARD_SCORE).any():
                    bad = col[np.nan_to_num(z) > MAX_STANDARD_SCORE][0]
                    raise InvalidRequest(
                        f"feature {e.name!r} = {bad:g} is out of range: more than "
                        f"{MAX_STANDARD_SCORE:g} standard deviations from the training mean "
                        f"({e.mean:g})"
                    )
            else:
                col = np.array([_as_text(e.name, r.get(e.name)) for r in rows])
            parts.append(e.encode(col))
        parts.append(np.zeros((len(rows), len(self.history_names)), np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def to_json(self) -> dict:
        return {
            "side": self.side,
            "encoders": [e.to_json() for e in self.encoders],
            "history_names": self.history_names,
        }

    @classmethod
    def from_json(cls, meta: dict, history: np.ndarray) -> FeaturePipeline:
        return cls(meta["side"], [ColumnEncoder(**e) for e in meta["encoders"]], history, meta["history_names"])


# A raw numeric feature further than this from the training mean, in standard deviations,
# is refused: the tower would compute with it in float32 and could overflow to inf / NaN.
MAX_STANDARD_SCORE = 1e6


def _as_flags(encoder: ColumnEncoder, value: object) -> np.ndarray:
    """A multi-hot value: label names where the column's labels are known, else
    ``width`` positional flags (:func:`engine.data.attributes.label_flags`)."""
    labels = encoder.vocab if len(encoder.vocab) == encoder.width else []
    return label_flags(f"feature {encoder.name!r}", labels, encoder.width, value).astype(np.float32)


def _as_text(name: str, value: object) -> str:
    """A categorical value: one text (a number is taken as its text; missing: "")."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict, set, np.ndarray)):
        raise InvalidRequest(f"feature {name!r} takes one text value, got {shorten(value)}")
    return str(value)


def _as_float(name: str, value: object) -> float:
    if value is None or value == "":
        return float("nan")
    if isinstance(value, (bool, list, tuple, dict, set, np.ndarray)):
        raise InvalidRequest(f"feature {name!r} must be a number, got {shorten(value)}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidRequest(f"feature {name!r} must be a number, got {shorten(value)}") from None
    if not np.isfinite(v):
        raise InvalidRequest(f"feature {name!r} must be finite, got {value!r}")
    return v


def _column(table: FeatureTable | None, encoder: ColumnEncoder, rows: np.ndarray) -> np.ndarray:
    if table is None or encoder.name not in table.columns:
        n = len(rows)
        if encoder.kind == "multihot":
            return np.zeros((n, encoder.width), np.float32)
        return np.full(n, np.nan) if encoder.kind == "numeric" else np.full(n, "")
    return table.columns[encoder.name][rows]


def _genres(dataset: Dataset) -> tuple[np.ndarray | None, list[str]]:
    if dataset.item_features is None or "genres" not in dataset.item_features.columns:
        return None, []
    return (
        dataset.item_features.columns["genres"].astype(np.float32),
        list(dataset.item_features.labels.get("genres", [])),
    )


def fit_user_pipeline(train: Dataset, min_count: int = 1) -> FeaturePipeline:
    """User features: the table's columns, plus each user's rating history overall and
    per genre (average centred on the global mean, ``log1p`` count) from ``train``.

    On a rank of a distributed run (every rank calls it, with its users' interactions;
    :mod:`engine.models.distributed`) the statistics are sums over the ranks: the
    pipeline is the whole data's, the same on every rank."""
    count = distributed.total_array(np.bincount(train.user_idx, minlength=train.n_users))
    has_ratings = np.flatnonzero(count > 0)
    table = train.user_features
    encoders = [
        fit_column(name, col, has_ratings, min_count, table.labels.get(name) if table else None)
        for name, col in (table.columns.items() if table else [])
    ]
    mean = _mean_rating(train)
    centred = train.ratings - mean
    total = distributed.total_array(np.bincount(train.user_idx, weights=centred, minlength=train.n_users))
    history = [total / np.maximum(count, 1), np.log1p(count)]
    names = ["avg_rating", "log_count"]
    genres, labels = _genres(train)
    if genres is not None:
        g = genres[train.item_idx]  # [n_ratings, n_genres]
        import scipy.sparse as sp

        by_user = sp.csr_matrix(
            (np.ones(train.n_ratings), (train.user_idx, np.arange(train.n_ratings))),
            shape=(train.n_users, train.n_ratings),
        )
        g_count = distributed.total_array(np.asarray(by_user @ g))
        g_sum = distributed.total_array(np.asarray(by_user @ (g * centred[:, None])))
        history += [g_sum / np.maximum(g_count, 1), np.log1p(g_count)]
        names += [f"avg_rating[{l}]" for l in labels] + [f"log_count[{l}]" for l in labels]
    hist = np.column_stack([h if h.ndim == 2 else h[:, None] for h in history]).astype(np.float32)
    return FeaturePipeline("user", encoders, hist, names)


def _mean_rating(train: Dataset) -> float:
    """The mean rating of the interactions (on N ranks: of every rank's)."""
    n = distributed.total(train.n_ratings)
    return distributed.total(float(train.ratings.sum(dtype=np.float64))) / n if n else 0.0


def fit_item_pipeline(train: Dataset, min_count: int = 1) -> FeaturePipeline:
    """Item features: the table's columns (genres, tags, year, category, price, ...;
    titles are display data, not features), plus each item's training average rating
    (centred) and ``log1p`` count. On N ranks, the whole data's (as
    :func:`fit_user_pipeline`)."""
    count = distributed.total_array(np.bincount(train.item_idx, minlength=train.n_items))
    has_ratings = np.flatnonzero(count > 0)
    table = train.item_features
    encoders = [
        fit_column(name, col, has_ratings, min_count, table.labels.get(name) if table else None)
        for name, col in (table.columns.items() if table else [])
    ]
    mean = _mean_rating(train)
    total = distributed.total_array(np.bincount(train.item_idx, weights=train.ratings - mean, minlength=train.n_items))
    hist = np.column_stack([total / np.maximum(count, 1), np.log1p(count)]).astype(np.float32)
    return FeaturePipeline("item", encoders, hist, ["avg_rating", "log_count"])
