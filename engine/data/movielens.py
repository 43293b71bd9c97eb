"""Loaders for the MovieLens family.

- ``load_ml100k(dir)``: MovieLens 100K (``u.data``, ``u.item``, ``u.user``, ``u.genre``).
- ``load_ml1m(dir)``: MovieLens 1M (``ratings.dat``, ``movies.dat``, ``users.dat``, ``::``).
- ``load_movielens_csv(dir)``: the ``ratings.csv`` + ``movies.csv`` family
  (ml-latest-small, ml-25m, ml-32m), with optional ``tags.csv``.
- ``detect_flavour(dir)`` tells which of these a directory holds.

Every loader gives items the features ``genres`` (multi-hot) and ``year`` (float32,
NaN when unknown) and the item titles; users get ``age``, ``gender``, ``occupation``
and ``zip_code`` where the flavour has them. Malformed input raises
:class:`DataFormatError` with file and line.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from engine.data._tables import FLOAT, ID, INT, align_ids, read_delimited_interactions, undecodable
from engine.data.dataset import Dataset, FeatureTable
from engine.errors import DataFormatError

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

# MovieLens 1M codes occupations as integers (its README gives the names).
ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]

_YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
RATING_FIELDS = [("user", ID), ("item", ID), ("rating", FLOAT), ("timestamp", INT)]


def detect_flavour(directory: str | os.PathLike) -> str:
    """Which MovieLens flavour a directory holds: ``"ml-100k"``, ``"ml-1m"`` or
    ``"ml-csv"``. Raises :class:`DataFormatError` when it holds none."""
    d = Path(directory)
    if (d / "u.data").is_file():
        return "ml-100k"
    if (d / "ratings.dat").is_file():
        return "ml-1m"
    if (d / "ratings.csv").is_file():
        return "ml-csv"
    raise DataFormatError(
        d,
        None,
        "not a MovieLens directory: expected u.data (100K), ratings.dat (1M) or ratings.csv (latest-small/25M/32M)",
    )


def _read_lines(path: Path, encoding: str):
    """Yield ``(line_no, text)`` for the non-blank lines of a small metadata file."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            for line_no, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if line.strip():
                    yield line_no, line
    except UnicodeDecodeError:
        raise undecodable(path, encoding) from None


def _split(path: Path, line_no: int, line: str, sep: str, n_fields: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) != n_fields:
        raise DataFormatError(
            path, line_no, f"expected {n_fields} fields separated by {sep!r}, found {len(parts)}: {line[:80]!r}"
        )
    return parts


def _number(path: Path, line_no: int, name: str, value: str, missing_ok: bool = False) -> float:
    if missing_ok and not value.strip():
        return float("nan")
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(path, line_no, f"field {name!r} should be a number, found {value!r}") from None


def year_from_title(title: str) -> float:
    """The year a MovieLens title ends with, ``"Toy Story (1995)"`` -> 1995.0, else NaN."""
    m = _YEAR_IN_TITLE.search(title)
    return float(m.group(1)) if m else float("nan")


def _item_features(
    genre_rows: np.ndarray, genre_labels: list[str], years: np.ndarray, extra: dict[str, np.ndarray] | None = None
) -> FeatureTable:
    columns: dict[str, np.ndarray] = {"genres": genre_rows.astype(np.uint8), "year": years.astype(np.float32)}
    columns.update(extra or {})
    return FeatureTable(columns, {"genres": list(genre_labels)})


def _reindex_rows(rows_by_id: dict[str, int], id_map) -> np.ndarray:
    """Position in the metadata table of each id of the map (-1 when absent)."""
    return np.array([rows_by_id.get(i, -1) for i in id_map.ids.tolist()], dtype=np.int64)


def _take_or_missing(values: np.ndarray, rows: np.ndarray, missing) -> np.ndarray:
    """``values[rows]``, with ``missing`` where rows is -1 (an id with no metadata)."""
    if len(values) == 0:
        shape = (len(rows),) + values.shape[1:]
        return np.full(shape, missing, dtype=values.dtype)
    out = values[np.maximum(rows, 0)].copy()
    out[rows < 0] = missing
    return out


def _assemble(name: str, inter, item_meta: dict, user_meta: dict | None) -> Dataset:
    """Join interactions with item (and user) metadata tables into one Dataset.

    ``item_meta``: ``ids`` [m] plus per-row arrays ``titles``, ``genres`` [m, g],
    ``genre_labels``, ``years`` and optional ``extra`` columns. ``user_meta``: ``ids``
    plus ``columns`` (name -> [m] array).
    """
    item_codes, items = align_ids(inter.item_codes, inter.item_ids, item_meta["ids"], "item")
    if user_meta is not None:
        user_codes, users = align_ids(inter.user_codes, inter.user_ids, user_meta["ids"], "user")
    else:
        user_codes, users = align_ids(inter.user_codes, inter.user_ids, None, "user")

    rows = _reindex_rows({s: k for k, s in enumerate(item_meta["ids"])}, items)
    titles = _take_or_missing(np.asarray(item_meta["titles"], dtype=str), rows, "")
    genres = _take_or_missing(item_meta["genres"], rows, 0)
    years = _take_or_missing(item_meta["years"], rows, np.nan)
    extra = {
        k: _take_or_missing(v, rows, "" if v.dtype.kind == "U" else np.nan)
        for k, v in item_meta.get("extra", {}).items()
    }
    item_features = _item_features(genres, item_meta["genre_labels"], years, extra)

    user_features = None
    if user_meta is not None:
        urows = _reindex_rows({s: k for k, s in enumerate(user_meta["ids"])}, users)
        user_features = FeatureTable(
            {
                k: _take_or_missing(v, urows, "" if v.dtype.kind == "U" else np.nan)
                for k, v in user_meta["columns"].items()
            }
        )
    return Dataset(
        user_codes,
        item_codes,
        inter.ratings,
        inter.timestamps,
        users,
        items,
        user_features=user_features,
        item_features=item_features,
        item_titles=titles,
        name=name,
    )


# --------------------------------------------------------------------------- 100K
def _read_ml100k_items(d: Path) -> dict:
    labels = ML100K_GENRES
    genre_file = d / "u.genre"
    if genre_file.is_file():
        labels = []
        for _line_no, line in _read_lines(genre_file, "latin-1"):
            name, _, _ = line.partition("|")
            labels.append(name)
    n_fields = 5 + len(labels)
    ids, titles, years, genres = [], [], [], []
    path = d / "u.item"
    for line_no, line in _read_lines(path, "latin-1"):
        parts = _split(path, line_no, line, "|", n_fields)
        if not parts[0].strip():
            raise DataFormatError(path, line_no, "field 'movie id' is empty")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataFormatError(path, line_no, f"genre flags must be 0 or 1, found {flags}")
        ids.append(parts[0])
        titles.append(parts[1])
        # Release date is "01-Jan-1995"; fall back on the title's "(1995)".
        date = parts[2].strip()
        year = float(date[-4:]) if re.fullmatch(r"\d{2}-\w{3}-\d{4}", date) else year_from_title(parts[1])
        years.append(year)
        genres.append([int(f) for f in flags])
    return {
        "ids": np.asarray(ids, dtype=str),
        "titles": titles,
        "genres": np.asarray(genres, dtype=np.uint8).reshape(len(ids), len(labels)),
        "genre_labels": labels,
        "years": np.asarray(years, dtype=np.float32),
    }


def _read_ml100k_users(d: Path) -> dict:
    path = d / "u.user"
    ids, age, gender, occupation, zips = [], [], [], [], []
    for line_no, line in _read_lines(path, "latin-1"):
        uid, a, g, occ, z = _split(path, line_no, line, "|", 5)
        if not uid.strip():
            raise DataFormatError(path, line_no, "field 'user id' is empty")
        ids.append(uid)
        age.append(_number(path, line_no, "age", a, missing_ok=True))
        gender.append(g)
        occupation.append(occ)
        zips.append(z)
    return {
        "ids": np.asarray(ids, dtype=str),
        "columns": {
            "age": np.asarray(age, np.float32),
            "gender": np.asarray(gender, str),
            "occupation": np.asarray(occupation, str),
            "zip_code": np.asarray(zips, str),
        },
    }


def read_ml100k_ratings(path: str | os.PathLike):
    """Interactions of a ``u.data``-format file (``u1.base`` etc. share it)."""
    return read_delimited_interactions(path, RATING_FIELDS, "\t", header=False)


def load_ml100k(directory: str | os.PathLike, ratings_file: str = "u.data") -> Dataset:
    """MovieLens 100K. ``ratings_file`` may name a fold file such as ``u1.base``; the id
    maps always cover every user of ``u.user`` and every item of ``u.item``."""
    d = Path(directory)
    inter = read_ml100k_ratings(d / ratings_file)
    items = _read_ml100k_items(d) if (d / "u.item").is_file() else _no_items()
    users = _read_ml100k_users(d) if (d / "u.user").is_file() else None
    return _assemble(f"ml-100k/{ratings_file}", inter, items, users)


def _no_items() -> dict:
    return {
        "ids": np.asarray([], dtype=str),
        "titles": [],
        "genres": np.zeros((0, 0), np.uint8),
        "genre_labels": [],
        "years": np.zeros(0, np.float32),
    }


# ---------------------------------------------------------------------------- 1M
def _items_table(ids: list[str], titles: list[str], genre_lists: list[list[str]]) -> dict:
    """The item side of a movies file: ids, titles, genre flags and labels, and the year
    from each title."""
    matrix, labels = _genre_matrix(genre_lists)
    return {
        "ids": np.asarray(ids, str),
        "titles": titles,
        "genres": matrix,
        "genre_labels": labels,
        "years": np.asarray([year_from_title(t) for t in titles], np.float32),
    }


def _genre_matrix(genre_lists: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    labels = sorted({g for gs in genre_lists for g in gs})
    col = {g: k for k, g in enumerate(labels)}
    m = np.zeros((len(genre_lists), len(labels)), np.uint8)
    for r, gs in enumerate(genre_lists):
        for g in gs:
            m[r, col[g]] = 1
    return m, labels


def _parse_genres(text: str) -> list[str]:
    text = text.strip()
    if not text or text == "(no genres listed)":
        return []
    return [g for g in text.split("|") if g]


def load_ml1m(directory: str | os.PathLike) -> Dataset:
    """MovieLens 1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` with ``::`` separators."""
    d = Path(directory)
    inter = read_delimited_interactions(d / "ratings.dat", RATING_FIELDS, "::", header=False, encoding="latin-1")
    items = _no_items()
    path = d / "movies.dat"
    if path.is_file():
        ids, titles, genre_lists = [], [], []
        for line_no, line in _read_lines(path, "latin-1"):
            mid, title, genres = _split(path, line_no, line, "::", 3)
            if not mid.strip():
                raise DataFormatError(path, line_no, "field 'MovieID' is empty")
            ids.append(mid)
            titles.append(title)
            genre_lists.append(_parse_genres(genres))
        items = _items_table(ids, titles, genre_lists)
    users = None
    path = d / "users.dat"
    if path.is_file():
        ids, gender, age, occupation, zips = [], [], [], [], []
        for line_no, line in _read_lines(path, "latin-1"):
            uid, g, a, occ, z = _split(path, line_no, line, "::", 5)
            ids.append(uid)
            gender.append(g)
            age.append(_number(path, line_no, "Age", a))
            code = _number(path, line_no, "Occupation", occ)
            if not (0 <= code < len(ML1M_OCCUPATIONS)) or code != int(code):
                raise DataFormatError(path, line_no, f"occupation code must be 0..20, found {occ!r}")
            occupation.append(ML1M_OCCUPATIONS[int(code)])
            zips.append(z)
        users = {
            "ids": np.asarray(ids, str),
            "columns": {
                "age": np.asarray(age, np.float32),
                "gender": np.asarray(gender, str),
                "occupation": np.asarray(occupation, str),
                "zip_code": np.asarray(zips, str),
            },
        }
    return _assemble("ml-1m", inter, items, users)


# ------------------------------------------------------------ ratings.csv family
def _csv_rows(path: Path, expected_header: list[str]):
    """Yield ``(line_no, fields)`` of a CSV file whose header must start with
    ``expected_header`` (quoted fields, as in movies.csv titles, are handled)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[: len(expected_header)]] != expected_header:
                raise DataFormatError(path, 1, f"expected header {','.join(expected_header)}, found {header}")
            for fields in reader:
                if fields:
                    if len(fields) != len(header):
                        raise DataFormatError(
                            path, reader.line_num, f"expected {len(header)} fields, found {len(fields)}: {fields}"
                        )
                    yield reader.line_num, fields
    except UnicodeDecodeError:
        raise undecodable(path) from None
    except csv.Error as e:
        raise DataFormatError(path, None, f"CSV error: {e}") from None


def load_movielens_csv(directory: str | os.PathLike, with_tags: bool = True) -> Dataset:
    """The ``ratings.csv`` + ``movies.csv`` family (ml-latest-small, ml-25m, ml-32m).

    When ``tags.csv`` is present (and ``with_tags``), each item gets a ``tags`` feature:
    multi-valued labels (its distinct lower-cased tags, the most frequent
    :data:`~engine.data.side_tables.MAX_LABELS` of the file), as genres are.
    """
    d = Path(directory)
    path = d / "ratings.csv"
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
    except UnicodeDecodeError:
        raise undecodable(path) from None
    if header[:4] != ["userId", "movieId", "rating", "timestamp"]:
        raise DataFormatError(path, 1, f"expected header userId,movieId,rating,timestamp, found {header}")
    inter = read_delimited_interactions(path, RATING_FIELDS, ",", header=True)
    items = _no_items()
    path = d / "movies.csv"
    if path.is_file():
        ids, titles, genre_lists = [], [], []
        for line_no, (mid, title, genres) in _csv_rows(path, ["movieId", "title", "genres"]):
            if not mid.strip():
                raise DataFormatError(path, line_no, "field 'movieId' is empty")
            ids.append(mid.strip())
            titles.append(title.strip())
            genre_lists.append(_parse_genres(genres))
        items = _items_table(ids, titles, genre_lists)
    path = d / "tags.csv"
    if with_tags and path.is_file() and len(items["ids"]):
        tags: dict[str, set[str]] = {}
        for _, fields in _csv_rows(path, ["userId", "movieId", "tag"]):
            tags.setdefault(fields[1].strip(), set()).add(fields[2].strip().lower())
        items["extra"] = {"tags": np.asarray(["|".join(sorted(tags.get(i, ()))) for i in items["ids"]], str)}
    dataset = _assemble(d.name or "ml-csv", inter, items, None)
    features = dataset.item_features
    if features is not None and "tags" in features.columns:  # "a|b" texts -> multi-hot labels
        from engine.data.side_tables import as_labels

        flags, features.labels["tags"], _ = as_labels(features.columns["tags"].astype(object))
        features.columns["tags"] = flags
    return dataset
