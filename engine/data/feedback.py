"""Live feedback: the events users' actions produce, their log, and how they count.

An event is ``{"user_id", "item_id", "kind", "value", "timestamp"}``: a user did something
(``kind``, one of ``[engine.feedback] kinds``: ``view``, ``click``, ``purchase``,
``rating`` by default) to an item, with an optional ``value`` (required for the
``rating_kinds``: the rating) and an optional time (seconds since the epoch; default:
when it is recorded). The server processes of a bundle root append events to one log,
``<root>/feedback.jsonl`` (one JSON object per line, :mod:`engine.journal`).

How events count — one rule, shared by serving (:mod:`engine.serving.feedback`) and
training (:func:`with_feedback`), so that a user's history is the same for both:

- The events of one (user, item) pair make one interaction of the user's history. Its
  value is the latest value an event gave; an event without a value keeps the pair's
  value (from the training data, or an earlier event), and a pair that never had one
  takes ``default_value``. On implicit data (every interaction of the data has the same
  value) every pair has that value: the data has no scale for a value to be on.
- The pair is a like (feeding the ``recent`` source) when one of its events has a kind
  of ``like_kinds``, or when its value is one by the data's rule
  (:func:`engine.data.dataset.liked_mask`: every interaction of implicit data, ratings of
  4 and more otherwise).
- Its time is the latest of its events' times (and of its training interaction's).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import journal
from engine.data.dataset import Dataset, FeatureTable, IdMap, liked_mask
from engine.errors import InvalidRequest, shorten
from engine.settings import FeedbackConfig

FEEDBACK_LOG = "feedback.jsonl"  # at the bundle root
EVENT_FIELDS = ("user_id", "item_id", "kind", "value", "timestamp")


@dataclass
class FeedbackEvents:
    """Events, column by column, in the order they happened (were recorded)."""

    user_ids: list[str]
    item_ids: list[str]
    kinds: list[str]
    values: np.ndarray  # [n] float64, NaN where the event carries no value
    timestamps: np.ndarray  # [n] float64 seconds since the epoch

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def empty(cls) -> FeedbackEvents:
        return cls([], [], [], np.zeros(0), np.zeros(0))

    def encode(self) -> bytes:
        """The events as log lines."""
        lines = []
        for user, item, kind, value, at in zip(
            self.user_ids, self.item_ids, self.kinds, self.values.tolist(), self.timestamps.tolist()
        ):
            record = {"user_id": user, "item_id": item, "kind": kind, "value": None if value != value else value}
            record["timestamp"] = at
            lines.append(json.dumps(record))
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""

    def take(self, keep: np.ndarray) -> FeedbackEvents:
        """The events where ``keep`` (bool) holds, in order."""
        at = np.flatnonzero(keep).tolist()
        return FeedbackEvents(
            [self.user_ids[j] for j in at],
            [self.item_ids[j] for j in at],
            [self.kinds[j] for j in at],
            self.values[keep],
            self.timestamps[keep],
        )


def checked_events(events: Sequence[Mapping], config: FeedbackConfig, max_id_length: int) -> FeedbackEvents:
    """A request's events, validated before anything is recorded (all or nothing): each a
    mapping of :data:`EVENT_FIELDS` with a non-empty ``user_id`` and ``item_id``, a known
    ``kind``, a finite ``value`` (required for rating kinds, at least 0 for the others)
    and a finite ``timestamp`` of at least 0 (default: now). Raises :class:`InvalidRequest`
    naming the event and the problem. (Whether the item exists is the engine's check.)"""
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
        raise InvalidRequest("events must be a list of event mappings")
    if not events:
        raise InvalidRequest("record needs at least one event")
    now = time.time()
    users: list[str] = []
    items: list[str] = []
    kinds: list[str] = []
    values, stamps = np.full(len(events), np.nan), np.full(len(events), now)
    for j, event in enumerate(events):
        where = f"event {j}"
        if not isinstance(event, Mapping):
            raise InvalidRequest(f"{where}: must be a mapping of {EVENT_FIELDS}, got {shorten(event)}")
        unknown = [key for key in event if key not in EVENT_FIELDS]
        if unknown:
            raise InvalidRequest(f"{where}: unknown field(s) {shorten(unknown)}; fields: {list(EVENT_FIELDS)}")
        for key, kept in (("user_id", users), ("item_id", items)):
            value = event.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"{where}: {key} must be a non-empty string, got {shorten(value)}")
            if len(value) > max_id_length:
                raise InvalidRequest(
                    f"{where}: {key} of {len(value):,} characters; at most {max_id_length:,} (engine.max_id_length)"
                )
            kept.append(value)
        kind = event.get("kind")
        if kind not in config.kinds:
            raise InvalidRequest(
                f"{where}: unknown kind {shorten(kind)}; kinds: {config.kinds} (engine.feedback.kinds)"
            )
        kinds.append(str(kind))
        value = _number(event.get("value"), where, "value")
        if value is None and kind in config.rating_kinds:
            raise InvalidRequest(f"{where}: a {kind!r} event needs a value (the rating)")
        if value is not None:
            if value < 0 and kind not in config.rating_kinds:
                raise InvalidRequest(f"{where}: value must be >= 0 for a {kind!r} event, got {value}")
            values[j] = value
        stamp = _number(event.get("timestamp"), where, "timestamp")
        if stamp is not None:
            if stamp < 0:
                raise InvalidRequest(f"{where}: timestamp must be >= 0 (seconds since the epoch), got {stamp}")
            stamps[j] = stamp
    return FeedbackEvents(users, items, kinds, values, stamps)


def _number(value: object, where: str, name: str) -> float | None:
    """An optional finite number of an event (None: not given)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequest(f"{where}: {name} must be a number, got {shorten(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidRequest(f"{where}: {name} must be finite, got {number}")
    return number


# ------------------------------------------------------------------- the log
def read_log(path: str | Path, offset: int = 0, end: int | None = None) -> tuple[FeedbackEvents, int]:
    """The events of a feedback log from byte ``offset`` (to ``end`` at most), and the
    offset after the last whole line read. Bad lines are logged and skipped; a partial
    last line is left for the next read (:mod:`engine.journal`)."""
    data, after = journal.read_bytes(path, offset, end)
    return parse_log(path, data, offset), after


def parse_log(path: str | Path, data: bytes, offset: int) -> FeedbackEvents:
    """The events of ``data``, whole lines read from byte ``offset`` of the log at ``path``
    (which bad lines' warnings name)."""
    if not data:
        return FeedbackEvents.empty()
    try:  # the common case, one parse for the whole chunk; line by line names a bad line
        rows = json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]")
        parsed = [_event(row) for row in rows]
    except ValueError:
        parsed = journal.records(path, data, offset, _event)
    return FeedbackEvents(
        [p[0] for p in parsed],
        [p[1] for p in parsed],
        [p[2] for p in parsed],
        np.array([p[3] for p in parsed], np.float64),
        np.array([p[4] for p in parsed], np.float64),
    )


def _event(record: dict) -> tuple[str, str, str, float, float]:
    """One log line as ``(user_id, item_id, kind, value (NaN: none), timestamp)``."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    user, item, kind = record.get("user_id"), record.get("item_id"), record.get("kind")
    if not (isinstance(user, str) and user and isinstance(item, str) and item and isinstance(kind, str)):
        raise ValueError("expected string user_id, item_id and kind")
    value, stamp = record.get("value"), record.get("timestamp")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError("value must be a number or null")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        raise ValueError("timestamp must be a number")
    return user, item, kind, math.nan if value is None else float(value), float(stamp)


# --------------------------------------------------------------- the rule
def pair_values(
    base_keys: np.ndarray,
    base_values: np.ndarray,
    event_keys: np.ndarray,
    event_values: np.ndarray,
    default_value: float,
    implicit_value: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's value by the module's rule: ``(keys, values)``, keys sorted and
    unique (the union of both sides'). ``base_*``: the training interactions (unique
    keys); ``event_*``: events in the order they happened (NaN: no value);
    ``implicit_value``: the one value of implicit data (None for explicit data)."""
    keys = np.union1d(base_keys, event_keys)
    values = np.full(len(keys), np.nan)
    if implicit_value is not None:
        values[:] = implicit_value
        return keys, values
    values[np.searchsorted(keys, base_keys)] = base_values
    given = ~np.isnan(event_values)
    latest_first = event_keys[given][::-1]
    valued, first = np.unique(latest_first, return_index=True)  # each key's latest given value
    values[np.searchsorted(keys, valued)] = event_values[given][::-1][first]
    values[np.isnan(values)] = default_value
    return keys, values


def pair_likes(
    keys: np.ndarray, values: np.ndarray, event_keys: np.ndarray, event_liked: np.ndarray, implicit: bool
) -> np.ndarray:
    """``[len(keys)]`` bool: which pairs (sorted ``keys``, resolved ``values``) are likes:
    by the data's rule, or by an event of a like kind (``event_liked``)."""
    liked = liked_mask(values, implicit)
    liked[np.searchsorted(keys, event_keys[event_liked])] = True
    return liked


def implicit_value(dataset_implicit: bool, values: np.ndarray) -> float | None:
    """The one value of implicit data (1 when there is none to read), None for explicit."""
    if not dataset_implicit:
        return None
    return float(values[0]) if len(values) else 1.0


# ---------------------------------------------------------------- training
def with_feedback(
    dataset: Dataset, events: FeedbackEvents, config: FeedbackConfig, log_offset: int = 0, log=print
) -> Dataset:
    """``dataset`` with the events' interactions merged in by the module's rule: new users
    appended (without features), events of items the data does not know (items added
    live) skipped and counted. ``log_offset``: the log's cut-off the events end at,
    recorded as ``feedback_offset`` so the bundle built from the result replays only the
    events after it."""
    items = dataset.items.indices_or_missing(events.item_ids)
    kinds_known = np.array([k in config.kinds for k in events.kinds], bool)
    keep = (items >= 0) & kinds_known
    if not keep.all():
        log(f"  feedback: {int((~keep).sum()):,} event(s) of items (or kinds) this data does not know, not trained on")
    events, items = events.take(keep), items[keep]
    users = dataset.users.indices_or_missing(events.user_ids)
    new_ids = list(dict.fromkeys(u for u, at in zip(events.user_ids, users.tolist()) if at < 0))
    # (A fixed-width unicode map, not IdMap.extended's object array: bundles save it.)
    user_map = IdMap(np.array(dataset.users.ids.tolist() + new_ids, str), "user") if new_ids else dataset.users
    if new_ids:
        users = user_map.indices(events.user_ids)
    n_items = dataset.n_items
    base_keys = dataset.user_idx.astype(np.int64) * n_items + dataset.item_idx
    event_keys = users * n_items + items
    keys, values = pair_values(
        base_keys,
        dataset.ratings.astype(np.float64),
        event_keys,
        events.values,
        config.default_value,
        implicit_value(dataset.implicit, dataset.ratings),
    )
    stamps = np.full(len(keys), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(stamps, np.searchsorted(keys, base_keys), dataset.timestamps)
    np.maximum.at(stamps, np.searchsorted(keys, event_keys), events.timestamps.astype(np.int64))
    merged = Dataset(
        (keys // n_items).astype(np.int32),
        (keys % n_items).astype(np.int32),
        values.astype(np.float32),
        stamps,
        user_map,
        dataset.items,
        _extended(dataset.user_features, len(new_ids)),
        dataset.item_features,
        dataset.item_titles,
        name=dataset.name,
        drop_duplicates=False,
    )
    merged.feedback_offset = log_offset
    log(
        f"  feedback: {len(events):,} event(s) up to byte {log_offset:,} of the log merged: "
        f"{merged.n_ratings - dataset.n_ratings:,} new interaction(s), {len(new_ids):,} new user(s)"
    )
    return merged


def _extended(table: FeatureTable | None, n_new: int) -> FeatureTable | None:
    """A feature table with ``n_new`` rows of missing values appended (new users)."""
    if table is None or n_new == 0:
        return table
    columns = {}
    for name, column in table.columns.items():
        if column.ndim == 2:
            blank = np.zeros((n_new, column.shape[1]), column.dtype)
        elif column.dtype.kind == "f":
            blank = np.full(n_new, np.nan, column.dtype)
        else:
            blank = np.full(n_new, "", column.dtype)
        columns[name] = np.concatenate([column, blank])
    return FeatureTable(columns, dict(table.labels))


def with_root_feedback(
    dataset: Dataset, root: str | Path, config: FeedbackConfig, end: int | None = None, log=print
) -> Dataset:
    """``dataset`` with the events of ``<root>/feedback.jsonl`` up to byte ``end`` (default:
    the log's last whole line now) merged in (:func:`with_feedback`); ``dataset`` itself
    when the root has no events."""
    path = Path(root) / FEEDBACK_LOG
    events, after = read_log(path, 0, end)
    if not len(events):
        return dataset
    return with_feedback(dataset, events, config, after, log)
