"""Side tables: your own user or item attributes, from a CSV or Parquet file keyed by id.

A side table has one row per user (or item) and one column per attribute. Each column
has a kind, declared (``kinds``, e.g. ``{"price": "numeric", "tags": "labels"}``) or
inferred from its values:

- ``numeric``: every non-empty value is a number (missing: NaN);
- ``labels``: several labels per row separated by ``|`` (genres, tags), a multi-hot
  column over the most frequent :data:`MAX_LABELS` labels;
- ``title``: a column named ``title`` or ``name`` (items): display titles, not a feature;
- ``categorical``: any other text (missing: ""); a text column with mostly distinct
  values (free text, another id) is ``ignore``-d unless declared;
- ``ignore``: left out.

The id column is the data's own (``columns={"item": "sku"}``) or one of the usual names
(``item``, ``item_id``, ``movieId``, ...). Ids the interactions do not know are counted
and skipped; interactions' ids the table lacks get missing values. The result feeds the
towers (features, cold start), the bundle's item attributes (filters) and every rebuild:
it is part of the configured data (``data.item_features`` / ``data.user_features``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.data._tables import undecodable
from engine.data.dataset import Dataset, FeatureTable, IdMap
from engine.errors import DataFormatError

KINDS = ("numeric", "categorical", "labels", "title", "ignore")
LABEL_SEPARATOR = "|"
MAX_LABELS = 512  # most frequent labels kept per column: the multi-hot width stays bounded
_ID_NAMES = {
    "user": ("user", "user_id", "userId", "userid", "UserID", "customer", "customer_id"),
    "item": ("item", "item_id", "itemId", "itemid", "movieId", "movie_id", "MovieID", "product", "product_id", "sku"),
}
_TITLE_NAMES = ("title", "name")


@dataclass
class SideTable:
    """Attributes of a dataset's users or items, one row per dense index."""

    features: FeatureTable
    kinds: dict[str, str]  # column -> kind, for every column of the file but the id
    titles: np.ndarray | None = None  # items: [n_items] display titles ("" missing)
    n_unmatched: int = 0  # rows whose id the interactions do not know (skipped)
    dropped_labels: dict[str, int] = field(default_factory=dict)  # labels column -> labels beyond MAX_LABELS


def read_side_table(
    path: str | os.PathLike,
    side: str,
    ids: IdMap,
    id_column: str | None = None,
    kinds: dict[str, str] | None = None,
    delimiter: str = ",",
) -> SideTable:
    """Read a side table of ``side`` ("user" or "item") for the entities of ``ids``."""
    if side not in _ID_NAMES:
        raise ValueError(f"side must be 'user' or 'item', got {side!r}")
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(p, None, f"no such file (the {side} side table)")
    columns = _read_columns(p, delimiter)
    names = list(columns)
    id_name = id_column if id_column in columns else next((n for n in _ID_NAMES[side] if n in columns), None)
    if id_name is None:
        raise DataFormatError(
            p, 1, f"no {side} id column: name it {_ID_NAMES[side][0]!r} or as the interactions do; the file has {names}"
        )
    declared = dict(kinds or {})
    bad = {c: k for c, k in declared.items() if k not in KINDS}
    if bad:
        raise DataFormatError(p, None, f"unknown column kind(s) {bad}; kinds: {KINDS}")
    raw_ids = columns.pop(id_name)
    rows = ids.indices_or_missing(raw_ids)
    _check_unique(p, raw_ids, rows)
    matched = rows >= 0
    table, labels, found_kinds, dropped = {}, {}, {}, {}
    titles = None
    for name, values in columns.items():
        kind = declared.get(name) or _infer_kind(name, values, side)
        found_kinds[name] = kind
        if kind == "ignore":
            continue
        if kind == "title":
            titles = np.full(len(ids), "", dtype=object)
            titles[rows[matched]] = values[matched]
            titles = titles.astype(str)
        elif kind == "numeric":
            column = np.full(len(ids), np.nan, np.float32)
            column[rows[matched]] = _as_numbers(p, name, values)[matched]
            table[name] = column
        elif kind == "labels":
            flags, labels[name], dropped[name] = as_labels(values)
            column = np.zeros((len(ids), flags.shape[1]), np.uint8)
            column[rows[matched]] = flags[matched]
            table[name] = column
        else:
            column = np.full(len(ids), "", dtype=object)
            column[rows[matched]] = values[matched]
            table[name] = column.astype(str)
    return SideTable(
        FeatureTable(table, labels),
        found_kinds,
        titles,
        int((~matched).sum()),
        {k: v for k, v in dropped.items() if v},
    )


def with_side_tables(dataset: Dataset, item_table: SideTable | None = None, user_table: SideTable | None = None):
    """``dataset`` with the side tables' attributes added to its features (a side
    table's column replaces a same-named one) and, from an item table, its titles."""
    item_features, user_features, titles = dataset.item_features, dataset.user_features, dataset.item_titles
    if item_table is not None:
        item_features = _merged(item_features, item_table.features)
        titles = item_table.titles if item_table.titles is not None else titles
    if user_table is not None:
        user_features = _merged(user_features, user_table.features)
    return Dataset(
        dataset.user_idx,
        dataset.item_idx,
        dataset.ratings,
        dataset.timestamps,
        dataset.users,
        dataset.items,
        user_features,
        item_features,
        titles,
        name=dataset.name,
        drop_duplicates=False,
    )


def _merged(old: FeatureTable | None, new: FeatureTable) -> FeatureTable:
    if old is None:
        return new
    return FeatureTable({**old.columns, **new.columns}, {**old.labels, **new.labels})


def _read_columns(p: Path, delimiter: str) -> dict[str, np.ndarray]:
    """Every column of the file as strings ("" for missing), numbers as they are written."""
    import pyarrow as pa

    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(p)
        else:
            import pyarrow.csv as pcsv

            with open(p, encoding="utf-8") as f:
                header = f.readline().rstrip("\r\n").split(delimiter)
            table = pcsv.read_csv(
                p,
                parse_options=pcsv.ParseOptions(delimiter="\t" if p.suffix.lower() == ".tsv" else delimiter),
                convert_options=pcsv.ConvertOptions(
                    column_types={h.strip(): pa.string() for h in header}, strings_can_be_null=False
                ),
            )
    except UnicodeDecodeError:
        raise undecodable(p) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFormatError(p, None, f"not a readable table: {e}") from None
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):  # Parquet list: labels
            values = [LABEL_SEPARATOR.join(map(str, v or [])) for v in column.to_pylist()]
        else:
            values = ["" if v is None else str(v) for v in column.to_pylist()]
        out[name.strip()] = np.array(values, dtype=object)
    if not out:
        raise DataFormatError(p, 1, "empty file: a header line naming the columns is required")
    return out


def _check_unique(p: Path, raw_ids: np.ndarray, rows: np.ndarray) -> None:
    seen: dict[str, int] = {}
    for line, value in enumerate(raw_ids.tolist(), start=2):
        if value in seen:
            raise DataFormatError(p, line, f"id {value!r} repeats line {seen[value]}: one row per id")
        seen[value] = line


def _infer_kind(name: str, values: np.ndarray, side: str) -> str:
    present = [v for v in values.tolist() if v != ""]
    if side == "item" and name.lower() in _TITLE_NAMES:
        return "title"
    if not present:
        return "ignore"
    try:
        np.asarray(present, np.float64)
        return "numeric"
    except ValueError:
        pass
    if any(LABEL_SEPARATOR in v for v in present):
        return "labels"
    distinct = len(set(present))
    if distinct > 1000 and distinct > len(present) // 2:
        return "ignore"  # mostly distinct text: a description or another id, not a category
    return "categorical"


def _as_numbers(p: Path, name: str, values: np.ndarray) -> np.ndarray:
    out = np.full(len(values), np.nan, np.float32)
    for row, v in enumerate(values.tolist()):
        if v == "":
            continue
        try:
            out[row] = float(v)
        except ValueError:
            raise DataFormatError(p, row + 2, f"column {name!r} (numeric) should be a number, found {v!r}") from None
    return out


def as_labels(values: np.ndarray) -> tuple[np.ndarray, list[str], int]:
    """Multi-hot flags over the most frequent labels, the labels, and how many others
    were dropped."""
    per_row = [[label.strip() for label in v.split(LABEL_SEPARATOR) if label.strip()] for v in values.tolist()]
    counts = Counter(label for row in per_row for label in set(row))
    kept = sorted(label for label, _ in counts.most_common(MAX_LABELS))
    at = {label: j for j, label in enumerate(kept)}
    flags = np.zeros((len(values), len(kept)), np.uint8)
    for row, found in enumerate(per_row):
        flags[row, [at[label] for label in found if label in at]] = 1
    return flags, kept, len(counts) - len(kept)
