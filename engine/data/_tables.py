"""Reading interaction tables fast, and explaining them precisely when they are bad.

Large rating files (ML-25M has 25M lines) are parsed by Arrow's multi-threaded CSV
reader. Arrow's own error messages do not reliably name the line, so when parsing or
validation fails we re-scan the file in plain Python to find the first bad line and
raise a :class:`DataFormatError` naming file and line. The slow path runs only on
failure.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from engine.data.dataset import IdMap, factorize
from engine.errors import DataFormatError

# Field kinds understood by the validator.
ID, FLOAT, INT = "id", "float", "int"


@dataclass
class EncodedInteractions:
    """Interactions whose ids are dictionary-encoded: ``ids[codes]`` are the external ids."""

    user_codes: np.ndarray  # [n] int32 into user_ids
    user_ids: np.ndarray  # [n_distinct] str
    item_codes: np.ndarray  # [n] int32 into item_ids
    item_ids: np.ndarray  # [n_distinct] str
    ratings: np.ndarray  # [n] float32
    timestamps: np.ndarray  # [n] int64


def read_delimited_interactions(
    path: str | os.PathLike,
    fields: list[tuple[str, str]],
    delimiter: str,
    header: bool,
    encoding: str = "utf-8",
) -> EncodedInteractions:
    """Read a delimited file of interactions.

    Args:
        fields: ``(name, kind)`` for every field of a line, in order; the names
            ``user``, ``item``, ``rating`` and ``timestamp`` are kept, other names
            are read and dropped. ``rating`` and ``timestamp`` are optional.
        delimiter: the field separator; a multi-character one (``::``) is supported.
        header: whether the first line is a header to skip.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = os.fspath(path)
    names = [n for n, _ in fields]
    source: object = path
    arrow_delimiter = delimiter
    if len(delimiter) > 1:
        # Arrow takes single-character delimiters only; a tab cannot occur inside a
        # field of the "::" formats, so translate and parse the bytes in memory.
        with open(path, "rb") as f:
            source = io.BytesIO(f.read().replace(delimiter.encode(), b"\t"))
        arrow_delimiter = "\t"
    types = {n: {ID: pa.string(), FLOAT: pa.float32(), INT: pa.int64()}[k] for n, k in fields}
    wanted = [n for n in names if n in ("user", "item", "rating", "timestamp")]
    try:
        table = pcsv.read_csv(
            source,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, encoding=encoding),
            parse_options=pcsv.ParseOptions(delimiter=arrow_delimiter, quote_char=False),
            convert_options=pcsv.ConvertOptions(
                column_types=types, include_columns=wanted, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except UnicodeDecodeError:
        raise undecodable(path, encoding) from None
    except pa.ArrowInvalid as e:
        if "invalid UTF8" in str(e) or "invalid utf8" in str(e).lower():
            raise undecodable(path, encoding) from None
        raise _explain(path, fields, delimiter, header, encoding, fallback=str(e)) from None
    try:
        return encode_columns(table, path)
    except DataFormatError as e:
        raise _explain(path, fields, delimiter, header, encoding, fallback=e.problem) from None


def undecodable(path: str | os.PathLike, encoding: str = "utf-8") -> DataFormatError:
    """The error for a file that is not valid ``encoding`` text, naming its first bad
    line (read line by line in binary: only after a decoding failure)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                return DataFormatError(
                    path,
                    line_no,
                    f"not valid {encoding} text (byte {raw[e.start]:#04x} at "
                    f"column {e.start + 1}): convert the file to {encoding}",
                )
    return DataFormatError(path, None, f"not valid {encoding} text")


def encode_columns(table, path: str) -> EncodedInteractions:
    """Turn an Arrow table with columns user, item[, rating][, timestamp] into arrays,
    checking that ids are present and ratings finite."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    if n == 0:
        raise DataFormatError(path, None, "no interactions found (the file is empty)")

    def bad(name: str, mask, problem: str) -> DataFormatError:
        row = int(np.flatnonzero(np.asarray(mask))[0]) + 1
        return DataFormatError(path, None, f"data row {row}: column {name!r} {problem}")

    def encode(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = table.column(name)
        if col.null_count:
            raise bad(name, pc.is_null(col), "has a missing value")
        col = pc.cast(col, pa.string()).combine_chunks()
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
        if pc.any(empty).as_py():
            raise bad(name, empty, "has an empty id")
        enc = col.dictionary_encode()
        return (
            enc.indices.to_numpy().astype(np.int32),
            np.asarray(enc.dictionary.to_numpy(zero_copy_only=False), dtype=str),
        )

    u_codes, u_ids = encode("user")
    i_codes, i_ids = encode("item")
    if "rating" in table.column_names:
        col = table.column("rating")
        if col.null_count:
            raise bad("rating", pc.is_null(col), "has a missing value")
        try:
            ratings = pc.cast(col, pa.float32()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataFormatError(path, None, f"column 'rating' has type {col.type}, expected numbers") from None
        if not np.isfinite(ratings).all():
            raise bad("rating", ~np.isfinite(ratings), "is NaN or infinite")
    else:
        ratings = np.ones(n, np.float32)
    if "timestamp" in table.column_names:
        col = table.column("timestamp")
        if col.null_count:
            raise bad("timestamp", pc.is_null(col), "has a missing value")
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
        elif pa.types.is_floating(col.type):
            col = pc.cast(pc.floor(col), pa.int64())
        elif not pa.types.is_integer(col.type):
            raise DataFormatError(
                path, None, f"column 'timestamp' has type {col.type}, expected integer seconds or a datetime"
            )
        timestamps = pc.cast(col, pa.int64()).to_numpy()
    else:
        timestamps = np.zeros(n, np.int64)
    return EncodedInteractions(
        u_codes,
        u_ids,
        i_codes,
        i_ids,
        np.ascontiguousarray(ratings, np.float32),
        np.ascontiguousarray(timestamps, np.int64),
    )


def _explain(path: str, fields, delimiter: str, header: bool, encoding: str, fallback: str) -> DataFormatError:
    """Find the first bad line of a delimited file (slow path, only after a failure)."""
    expected = len(fields)
    try:
        with open(path, encoding=encoding, newline="") as f:
            for line_no, raw in enumerate(f, start=1):
                if header and line_no == 1:
                    continue
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split(delimiter)
                if len(parts) != expected:
                    return DataFormatError(
                        path,
                        line_no,
                        f"expected {expected} fields separated by {delimiter!r}, found {len(parts)}: {line[:80]!r}",
                    )
                for (name, kind), value in zip(fields, parts):
                    problem = _check_field(name, kind, value)
                    if problem:
                        return DataFormatError(path, line_no, problem)
    except UnicodeDecodeError as e:
        return DataFormatError(path, None, f"not valid {encoding} text: {e}")
    return DataFormatError(path, None, fallback)


def _check_field(name: str, kind: str, value: str) -> str | None:
    if kind == ID:
        return None if value.strip() else f"field {name!r} is empty"
    try:
        number = float(value) if kind == FLOAT else int(value)
    except ValueError:
        what = "a number" if kind == FLOAT else "an integer"
        return f"field {name!r} should be {what}, found {value!r}"
    if kind == FLOAT and not math.isfinite(number):
        return f"field {name!r} is not finite: {value!r}"
    return None


def align_ids(codes: np.ndarray, ids: np.ndarray, known_ids: np.ndarray | None, kind: str) -> tuple[np.ndarray, IdMap]:
    """Re-index dictionary codes onto one id map holding ``known_ids`` (e.g. every item
    of ``u.item``, rated or not) plus any id seen only in the interactions.

    Returns ``(dense codes [n] int32, IdMap)``.
    """
    all_ids = ids if known_ids is None else np.concatenate([np.asarray(known_ids, str), ids])
    all_codes, uniques = factorize(all_ids)
    # The last len(ids) codes map the dictionary entries; index them by the row codes.
    dictionary_to_dense = all_codes[len(all_ids) - len(ids) :]
    return dictionary_to_dense[codes].astype(np.int32), IdMap(uniques, kind)
