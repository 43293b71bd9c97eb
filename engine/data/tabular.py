"""Generic interaction tables: CSV (with a header) or Parquet, with a column mapping.

``columns`` maps Tandem's roles to the file's column names, e.g.
``{"user": "customer", "item": "sku", "rating": "stars", "timestamp": "ts"}``. ``user``
and ``item`` are required; ``rating`` (default 1.0, implicit data) and ``timestamp``
(integer seconds, or a datetime column) are optional. When no mapping is given, the
usual names are tried (``user``/``user_id``/``userId``, ``item``/``item_id``/``movieId``,
``rating``, ``timestamp``).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from engine.data._tables import align_ids, encode_columns, undecodable
from engine.data.dataset import Dataset
from engine.errors import DataFormatError

ROLES = ("user", "item", "rating", "timestamp")
_USUAL_NAMES = {
    "user": ("user", "user_id", "userId", "userid", "UserID"),
    "item": ("item", "item_id", "itemId", "itemid", "movieId", "movie_id", "MovieID"),
    "rating": ("rating", "Rating", "score"),
    "timestamp": ("timestamp", "Timestamp", "ts", "time"),
}


def resolve_columns(available: list[str], columns: dict[str, str] | None, path: Path) -> dict[str, str]:
    """Check a role -> column mapping against a file's columns (guessing it when absent)."""
    if columns is None:
        columns = {}
        for role, names in _USUAL_NAMES.items():
            found = next((n for n in names if n in available), None)
            if found:
                columns[role] = found
    unknown_roles = set(columns) - set(ROLES)
    if unknown_roles:
        raise DataFormatError(path, None, f"unknown column roles {sorted(unknown_roles)}; roles are {ROLES}")
    for role in ("user", "item"):
        if role not in columns:
            raise DataFormatError(
                path,
                None,
                f"no {role!r} column: map one with columns={{'{role}': NAME}} (on the command line: "
                f"--set data.columns.{role}=NAME; another field separator: --delimiter); the file has {available}",
            )
    for role, name in columns.items():
        if name not in available:
            raise DataFormatError(path, 1, f"column {name!r} (for {role}) is not in the header {available}")
    return dict(columns)


def load_table(
    path: str | os.PathLike, columns: dict[str, str] | None = None, delimiter: str = ",", name: str | None = None
) -> Dataset:
    """Load a CSV (``.csv``, ``.tsv``, ``.txt``) or Parquet (``.parquet``) interaction file."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(p, None, "no such file")
    if p.suffix.lower() in (".parquet", ".pq"):
        table, mapping = _read_parquet(p, columns)
    else:
        table, mapping = _read_csv(p, columns, "\t" if p.suffix.lower() == ".tsv" else delimiter)
    table = table.rename_columns([next(r for r, c in mapping.items() if c == col) for col in table.column_names])
    try:
        inter = encode_columns(table, str(p))
    except DataFormatError as e:
        if p.suffix.lower() in (".parquet", ".pq"):
            raise
        raise _explain_csv(p, mapping, delimiter, e.problem) from None
    user_codes, users = align_ids(inter.user_codes, inter.user_ids, None, "user")
    item_codes, items = align_ids(inter.item_codes, inter.item_ids, None, "item")
    return Dataset(user_codes, item_codes, inter.ratings, inter.timestamps, users, items, name=name or p.stem)


def _read_parquet(p: Path, columns: dict[str, str] | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFormatError(p, None, f"not a readable Parquet file: {e}") from None
    mapping = resolve_columns(list(schema.names), columns, p)
    return pq.read_table(p, columns=list(mapping.values())), mapping


def _read_csv(p: Path, columns: dict[str, str] | None, delimiter: str):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        with open(p, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except UnicodeDecodeError:
        raise undecodable(p) from None
    if not header:
        raise DataFormatError(p, 1, "empty file: a header line naming the columns is required")
    mapping = resolve_columns([h.strip() for h in header], columns, p)
    types = {mapping["user"]: pa.string(), mapping["item"]: pa.string()}
    if "rating" in mapping:
        types[mapping["rating"]] = pa.float32()
    try:
        table = pcsv.read_csv(
            p,
            parse_options=pcsv.ParseOptions(delimiter=delimiter),
            convert_options=pcsv.ConvertOptions(
                column_types=types, include_columns=list(mapping.values()), strings_can_be_null=False
            ),
        )
    except UnicodeDecodeError:
        raise undecodable(p) from None
    except pa.ArrowInvalid as e:
        if "utf8" in str(e).lower():
            raise undecodable(p) from None
        raise _explain_csv(p, mapping, delimiter, str(e)) from None
    return table, mapping


def _explain_csv(p: Path, mapping: dict[str, str], delimiter: str, fallback: str) -> DataFormatError:
    """Find the first bad line of a CSV file (slow path, only after a failure)."""
    try:
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip() for h in next(reader)]
            where = {role: header.index(col) for role, col in mapping.items()}
            for fields in reader:
                line = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    return DataFormatError(p, line, f"expected {len(header)} fields, found {len(fields)}")
                for role in ("user", "item"):
                    if not fields[where[role]].strip():
                        return DataFormatError(p, line, f"column {mapping[role]!r} ({role}) is empty")
                if "rating" in where:
                    value = fields[where["rating"]]
                    try:
                        ok = math.isfinite(float(value))
                    except ValueError:
                        ok = False
                    if not ok:
                        return DataFormatError(
                            p, line, f"column {mapping['rating']!r} (rating) should be a finite number, found {value!r}"
                        )
    except UnicodeDecodeError as e:
        return DataFormatError(p, None, f"not valid UTF-8 text: {e}")
    except csv.Error as e:
        return DataFormatError(p, None, f"CSV error: {e}")
    return DataFormatError(p, None, fallback)
