"""Item attributes as the engine filters on them: any numeric, categorical or
multi-valued (labels) column of the item features, by name.

A filter maps an attribute to a condition::

    {"genres": ["Comedy", "Drama"]}          # labels / categories: any of
    {"tags": {"all": ["pixar", "funny"]}}     # all of (labels)
    {"category": "shoes"}                     # one category
    {"price": {"lt": 100, "gte": 10}}         # a numeric range (lt, lte, gt, gte, eq)

Conditions on several attributes must all hold. An item with a missing value passes no
condition on that attribute. :meth:`ItemAttributes.mask` turns filters into the
``[n_items]`` mask the retrieval sources search under, so that filtering happens inside
the vector search and ``k`` results still come back.

:class:`ItemAttributes` is immutable: items added live make a new one
(:meth:`ItemAttributes.appended`), as the engine's catalogue does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.data.dataset import FeatureTable
from engine.errors import InvalidRequest, shorten

NUMERIC, CATEGORICAL, LABELS = "numeric", "categorical", "labels"
RANGE_OPERATORS = {"lt": np.less, "lte": np.less_equal, "gt": np.greater, "gte": np.greater_equal, "eq": np.equal}
SET_OPERATORS = ("any", "all")


@dataclass(frozen=True)
class Attribute:
    """One attribute of every item."""

    kind: str  # NUMERIC, CATEGORICAL or LABELS
    values: (
        np.ndarray
    )  # NUMERIC [n] float32 (NaN missing); CATEGORICAL [n] int32 codes (-1 missing); LABELS [n, L] uint8
    vocabulary: tuple[str, ...] = ()  # CATEGORICAL: the values the codes index; LABELS: the label names


class ItemAttributes:
    """The attributes of a catalogue's items, by name (see the module)."""

    def __init__(self, attributes: Mapping[str, Attribute] | None = None):
        self.attributes = dict(attributes or {})
        for a in self.attributes.values():
            a.values.flags.writeable = False  # shared by every request: never written

    def __contains__(self, name: str) -> bool:
        return name in self.attributes

    def __getitem__(self, name: str) -> Attribute:
        return self.attributes[name]

    @classmethod
    def of_features(cls, table: FeatureTable | None) -> ItemAttributes:
        """The attributes of an item feature table: float columns are numeric, text
        columns categorical, 2-D columns labels (named by ``table.labels``)."""
        out: dict[str, Attribute] = {}
        for name, column in (table.columns if table is not None else {}).items():
            column = np.asarray(column)
            if column.ndim == 2:
                labels = list(table.labels.get(name, [])) if table is not None else []
                labels = labels or [f"{name}[{k}]" for k in range(column.shape[1])]
                out[name] = Attribute(LABELS, (column != 0).astype(np.uint8), tuple(labels))
            elif column.dtype.kind in "fiu":
                out[name] = Attribute(NUMERIC, column.astype(np.float32))
            else:
                text = column.astype(str)
                vocabulary, codes = np.unique(text, return_inverse=True)
                missing = vocabulary == ""
                codes = np.where(missing[codes], -1, codes - np.cumsum(missing)[codes]).astype(np.int32)
                out[name] = Attribute(CATEGORICAL, codes, tuple(v for v in vocabulary.tolist() if v != ""))
        return cls(out)

    # ------------------------------------------------------------- filters
    def mask(self, filters: Mapping, n_items: int) -> np.ndarray:
        """``[n_items]`` bool: the items every condition of ``filters`` holds for."""
        if not isinstance(filters, Mapping):
            raise InvalidRequest(f"filters must map attribute names to conditions, got {shorten(filters)}")
        keep = np.ones(n_items, bool)
        for name, condition in filters.items():
            if name not in self.attributes:
                known = ", ".join(sorted(self.attributes)) or "none (the data has no item attributes)"
                raise InvalidRequest(f"unknown filter attribute {shorten(name)}; attributes: {known}")
            keep &= self._condition(str(name), self.attributes[name], condition)
        return keep

    def _condition(self, name: str, attribute: Attribute, condition: object) -> np.ndarray:
        if attribute.kind == NUMERIC:
            if not isinstance(condition, Mapping) or not condition or set(condition) - set(RANGE_OPERATORS):
                raise InvalidRequest(
                    f"filter {name!r} is numeric: give a range such as {{'lt': 100, 'gte': 10}} "
                    f"(operators: {', '.join(RANGE_OPERATORS)}), got {shorten(condition)}"
                )
            keep = np.ones(len(attribute.values), bool)
            for op, bound in condition.items():
                keep &= RANGE_OPERATORS[op](attribute.values, _number(name, op, bound))
            return keep  # NaN (missing) compares False: excluded
        if isinstance(condition, Mapping):
            if len(condition) != 1 or next(iter(condition)) not in SET_OPERATORS:
                raise InvalidRequest(
                    f"filter {name!r} takes a list of values (any of) or {{'any': [...]}} / {{'all': [...]}}, "
                    f"got {shorten(condition)}"
                )
            op, wanted = next(iter(condition.items()))
        else:
            op, wanted = "any", condition
        columns = self._columns(name, attribute, wanted)
        if attribute.kind == LABELS:
            flags = attribute.values[:, columns] != 0
            return np.asarray(flags.all(axis=1) if op == "all" else flags.any(axis=1))
        hits = np.isin(attribute.values, columns)
        return hits if op == "any" or len(set(columns)) <= 1 else np.zeros(len(hits), bool)

    @staticmethod
    def _columns(name: str, attribute: Attribute, wanted: object) -> list[int]:
        values = [wanted] if isinstance(wanted, str) else wanted
        if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"filter {name!r} takes a value or a non-empty list of values, got {shorten(wanted)}")
        unknown = [v for v in values if v not in attribute.vocabulary]
        if unknown:
            raise InvalidRequest(
                f"unknown value(s) {shorten(unknown)} of {name!r}; values: {shorten(list(attribute.vocabulary))}"
            )
        return [attribute.vocabulary.index(v) for v in values]

    # ------------------------------------------------------- live items
    def appended(self, rows: Sequence[Mapping]) -> ItemAttributes:
        """These attributes with new items' rows appended: each row maps attribute names
        to values — a number, a category, label names (or 0/1 flags in label order);
        absent names are missing. A category not seen before joins the vocabulary."""
        out = {}
        for name, a in self.attributes.items():
            given = [row.get(name) for row in rows]
            if a.kind == NUMERIC:
                new = np.array([_number(name, "value", v) if v not in (None, "") else math.nan for v in given])
                out[name] = Attribute(NUMERIC, np.concatenate([a.values, new.astype(np.float32)]))
            elif a.kind == CATEGORICAL:
                code_of = {value: code for code, value in enumerate(a.vocabulary)}
                codes = []
                for v in given:
                    text = "" if v is None else str(v)
                    if text:
                        code_of.setdefault(text, len(code_of))  # a new category joins the vocabulary
                    codes.append(code_of[text] if text else -1)
                vocabulary = list(code_of)
                out[name] = Attribute(
                    CATEGORICAL, np.concatenate([a.values, np.array(codes, np.int32)]), tuple(vocabulary)
                )
            else:
                width = len(a.vocabulary)
                flags = np.array([label_flags(repr(name), a.vocabulary, width, v) for v in given], np.uint8)
                flags = flags.reshape(len(rows), width)
                out[name] = Attribute(LABELS, np.concatenate([a.values, flags]), a.vocabulary)
        return ItemAttributes(out)


def _number(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidRequest(f"{name!r} {what} must be a number, got {shorten(value)}") from None
    if not math.isfinite(float(value)):
        raise InvalidRequest(f"{name!r} {what} must be finite, got {shorten(value)}")
    return float(value)


def label_flags(what: str, labels: Sequence[str], width: int, value: object) -> np.ndarray:
    """A multi-valued value (genres, tags) as ``width`` float64 0/1 flags: label names (a
    list, or one name) where ``labels`` names the flags, else the flags themselves in
    label order; missing (None) is all 0. ``what`` names the value in errors. The one
    reading of such a value, for the item tower's features and the item attributes."""
    if value is None:
        return np.zeros(width)
    names = [value] if isinstance(value, str) else value
    if labels and isinstance(names, (list, tuple)) and all(isinstance(v, str) for v in names):
        position = {label: j for j, label in enumerate(labels)}
        unknown = [v for v in names if v not in position]
        if unknown:
            raise InvalidRequest(f"unknown label(s) {shorten(unknown)} of {what}; labels: {shorten(list(labels))}")
        flags = np.zeros(width)
        flags[[position[v] for v in names]] = 1
        return flags
    expected = f"label names ({shorten(list(labels))}) or " if labels else ""
    problem = f"{what} takes {expected}a list of {width} flags (0 or 1) in label order, got {shorten(value)}"
    try:
        flags = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidRequest(problem) from None
    if len(flags) != width or not np.isin(flags, (0.0, 1.0)).all():
        raise InvalidRequest(problem)
    return flags
