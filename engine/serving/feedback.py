"""Live feedback in a running engine: events recorded (:meth:`LiveFeedback.record`) change
the next request of their user, survive restarts, and reach the other server processes of
the bundle root.

**Durable before acknowledged.** A batch of events is validated whole (all or nothing),
appended to ``<root>/feedback.jsonl`` under the log's lock and, with ``engine.feedback.fsync =
"batch"`` (the default), fsynced before :meth:`~LiveFeedback.record` returns: an
acknowledged event survives a SIGKILL (and, fsynced, an OS crash). Under the same lock the
writer first reads the lines other processes appended since its last read, so every
process applies the log's events in the log's order; between writes each process reads
them every ``engine.feedback.sync_interval`` (:meth:`~LiveFeedback.sync`). A bundle records
the bytes of the log its training data included (``manifest.feedback.offset``); loading it
replays the events after them. A partial last line (a write cut short by a crash) is left
unread, and cut off by the next write; a line that is not an event is logged and skipped.

**Effect at once.** A user with events is served from their whole history: the bundle's
training interactions plus their events, by the rule of :mod:`engine.data.feedback`. The
items join their seen items (excluded by default), their likes lead their recent likes
(the ``recent`` source), their like rate is recounted, and their CF vector is refitted by
fold-in (:meth:`engine.models.cf.CFModel.fold_in`); the tables the index builder computed
per user (top items of the ANN sources, recent likes) are bypassed for them. A new user
with events is served the same way (without a two-tower vector: they have no features).
Events on items added live (which have no CF vector) count as seen items only.

**Memory.** Events live in columns of compact arrays: item (int32), value (float32), kind
(int8), time (float64) and the same user's previous event (int32): 21 bytes an event, so
21 MB per million events (up to twice that while the arrays grow by doubling),
plus 8 bytes per user with events (and a dictionary entry with the id of each new user) and
4 bytes per user of the bundle. What a user's events make of them (:class:`LiveUser`) is
computed at their next request and cached for at most ``CACHED_USERS`` users.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np

from engine import journal
from engine.data.feedback import (
    FEEDBACK_LOG,
    FeedbackEvents,
    checked_events,
    implicit_value,
    pair_likes,
    pair_values,
    parse_log,
)
from engine.errors import UnknownIdError, shorten
from engine.index.bundle import root_of
from engine.serving.catalogue import read_only
from engine.serving.features import shrunk_mean
from engine.serving.retrieval import ann_search

if TYPE_CHECKING:
    from engine.serving.engine import Engine

log = logging.getLogger("tandem.engine")

CACHED_USERS = 10_000  # users whose LiveUser is kept between requests


@dataclass
class LiveUser:
    """A user as their recorded events leave them: what a request reads instead of the
    bundle's per-user tables."""

    history: np.ndarray  # [h] int64 sorted item indices: training items and items of events
    cf_query: np.ndarray  # [1, f + 1] float32: the fold-in vector as a query of cf_ip
    cf_bias: np.ndarray  # [1] float32
    recent: np.ndarray  # [1, R] int64 latest likes first, -1 pads
    like_rate: np.ndarray  # [1] float32
    # Source name -> [1, K]: the user's top unseen items in that source's index, searched
    # for their vector and history as the bundle's per-user tables are (-1 pads).
    top_items: dict[str, np.ndarray]


@dataclass
class Recorded:
    """What :meth:`LiveFeedback.record` did."""

    events: int  # events recorded
    new_users: int  # users created by them


@numba.njit(cache=True)
def _chain(previous: np.ndarray, last: int) -> np.ndarray:  # pragma: no cover - compiled
    """The event rows of one user, oldest first, from their last row back along ``previous``."""
    n, at = 0, last
    while at >= 0:
        n += 1
        at = previous[at]
    rows = np.empty(n, np.int64)
    at = last
    for j in range(n - 1, -1, -1):
        rows[j] = at
        at = previous[at]
    return rows


class LiveFeedback:
    """The events recorded since the bundle was built, and the users they changed."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.config = engine.config.feedback
        self._lock = threading.Lock()
        context = engine.user_context
        self._users = context.users
        root = root_of(engine.bundle.path)
        self.path: Path | None = None if root is None else root / FEEDBACK_LOG
        self._offset = int(engine.bundle.manifest.feedback.get("offset", 0))  # bytes of the log applied
        self._kind_code = {kind: code for code, kind in enumerate(self.config.kinds)}
        self._like_kind = np.array([kind in self.config.like_kinds for kind in self.config.kinds], bool)
        seen_values = engine.bundle.layout.load_table("seen_values", optional=True)
        # Bundles built before the table: every training interaction counts with value 1.
        self._seen_values = np.ones(len(context.seen_indices), np.float32) if seen_values is None else seen_values
        self._implicit_value = implicit_value(context.implicit, self._seen_values)
        # Events, one row each (grown by doubling).
        self.n_events = 0
        self._item = np.zeros(0, np.int32)
        self._value = np.zeros(0, np.float32)  # NaN: none given
        self._kind = np.zeros(0, np.int8)
        self._time = np.zeros(0, np.float64)
        self._previous = np.zeros(0, np.int32)  # the same user's previous event row (-1: none)
        # Live users: every user with events, numbered in order of their first event.
        self.n_users = 0
        self._last = np.zeros(0, np.int32)  # each live user's latest event row
        self._bundle_user = np.zeros(0, np.int32)  # their index in the bundle (-1: a new user)
        self._live_of_bundle_user = np.full(len(self._users), -1, np.int32)
        self._new_users: dict[str, int] = {}  # a new user's id -> their live index
        self._states: OrderedDict[int, LiveUser] = OrderedDict()  # cache (CACHED_USERS)
        self.skipped = 0  # log events that could not be applied (unknown items, kinds)

    @property
    def nbytes(self) -> int:
        """Bytes the live state holds: the event and user arrays (their capacity), and the
        new users' ids with their dictionary (the cache of LiveUser states aside)."""
        arrays: list[np.ndarray] = [self._item, self._value, self._kind, self._time, self._previous]
        arrays += [self._last, self._bundle_user, self._live_of_bundle_user]
        ids = sys.getsizeof(self._new_users) + sum(sys.getsizeof(user) for user in self._new_users)
        return sum(a.nbytes for a in arrays) + ids

    # ------------------------------------------------------------- users
    def live_index(self, user_id: object, bundle_index: int | None) -> int:
        """The live index of a user (``bundle_index``: theirs in the bundle, None for an
        unknown id), or -1 when they have no events. Takes no lock: an event is applied
        before its record call returns, so the next request finds it."""
        if not self.n_users:
            return -1
        if bundle_index is not None:
            return int(self._live_of_bundle_user[bundle_index])
        return self._new_users.get(str(user_id), -1)

    def live_indices(self, user_ids, bundle_indices: np.ndarray) -> np.ndarray:
        """:meth:`live_index` of many users (``bundle_indices``: -1 for unknown ids)."""
        out = np.full(len(bundle_indices), -1, np.int64)
        if not self.n_users:
            return out
        known = bundle_indices >= 0
        out[known] = self._live_of_bundle_user[bundle_indices[known]]
        if self._new_users:
            for row in np.flatnonzero(~known).tolist():
                if user_ids[row] is not None:
                    out[row] = self._new_users.get(str(user_ids[row]), -1)
        return out

    def user(self, live: int) -> LiveUser:
        """What live user ``live``'s history makes of them (computed once per change)."""
        with self._lock:
            state = self._states.get(live)
            if state is None:
                state = self._states[live] = self._compute(live)
                if len(self._states) > CACHED_USERS:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(live)
            return state

    def bundle_history(self, bundle_user: int) -> tuple[np.ndarray, np.ndarray]:
        """A bundle user's training items (indices, sorted) and their values."""
        context = self._engine.user_context
        span = slice(context.seen_indptr[bundle_user], context.seen_indptr[bundle_user + 1])
        return context.seen_indices[span].astype(np.int64), self._seen_values[span].astype(np.float64)

    def history(self, live: int) -> tuple[np.ndarray, np.ndarray]:
        """Live user ``live``'s whole history: their items (indices, sorted) and each
        pair's value, the bundle's interactions and their events by one rule
        (:func:`~engine.data.feedback.pair_values`)."""
        return self._history(live, _chain(self._previous, int(self._last[live])))

    def _history(self, live: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bundle_user = int(self._bundle_user[live])
        if bundle_user >= 0:
            base_items, base_values = self.bundle_history(bundle_user)
        else:
            base_items, base_values = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return pair_values(
            base_items,
            base_values,
            self._item[rows].astype(np.int64),
            self._value[rows].astype(np.float64),
            self.config.default_value,
            self._implicit_value,
        )

    def _compute(self, live: int) -> LiveUser:
        engine, context = self._engine, self._engine.user_context
        rows = _chain(self._previous, int(self._last[live]))
        items = self._item[rows].astype(np.int64)
        bundle_user = int(self._bundle_user[live])
        keys, values = self._history(live, rows)
        liked = pair_likes(keys, values, items, self._like_kind[self._kind[rows]], context.implicit)
        # The CF fold-in from every pair with a CF vector (items added live have none); a
        # training user is shrunk toward the point training shrank them toward.
        cf = engine.cf
        has_vector = keys < len(cf.items)
        prior = cf.user_prior[bundle_user] if cf.user_prior is not None and bundle_user >= 0 else None
        folded = cf.fold_in_indices(keys[has_vector], values[has_vector], prior)
        query, bias = cf.fold_in_query(folded), np.float32(folded.bias)
        if not (np.isfinite(query).all() and np.isfinite(bias)):
            log.warning(json.dumps({"event": "fold_in_not_finite", "live_user": live}))
            query, bias = np.zeros_like(query), np.float32(0)
        # Recent likes: the liked pairs of events, latest event first, then the bundle's.
        at = np.searchsorted(keys, items)
        latest, last_row = np.full(len(keys), -np.inf), np.full(len(keys), -1)
        np.maximum.at(latest, at, self._time[rows])
        np.maximum.at(last_row, at, rows)
        order = np.lexsort((-last_row, -latest))  # latest time first; ties: the later event
        fresh = order[(latest[order] > -np.inf) & liked[order] & has_vector[order]]
        width = context.recent.shape[1]
        recent = keys[fresh][:width].tolist()
        if bundle_user >= 0 and len(recent) < width:
            still_liked = set(keys[liked].tolist())
            for item in context.recent[bundle_user].tolist():
                if item >= 0 and item in still_liked and item not in recent:
                    recent.append(item)
        recent_row = np.full((1, width), -1, np.int64)
        recent_row[0, : min(len(recent), width)] = recent[:width]
        like_rate = shrunk_mean(float(liked.sum()), len(liked), context.mean_like_rate)
        queries = {cf.name: query.astype(np.float32)}
        towers = context.user_queries[engine.towers.name]
        if 0 <= bundle_user < len(towers):  # the user tower reads features, not history: unchanged
            queries[engine.towers.name] = towers[bundle_user]
        # Shared by the user's requests until their history changes: read-only.
        return LiveUser(
            read_only(keys),
            queries[cf.name][None, :],
            np.array([bias], np.float32),
            recent_row,
            np.array([like_rate], np.float32),
            {name: self._top_items(name, q, keys) for name, q in queries.items() if self._tabled(name)},
        )

    def _tabled(self, name: str) -> bool:
        source = self._engine._catalogue.sources.get(name)
        return source is not None and getattr(source, "top_items", None) is not None

    def _top_items(self, name: str, query: np.ndarray, history: np.ndarray) -> np.ndarray:
        """A row like the bundle's ``user_top_<index>`` tables for a live user: their top
        items in source ``name``'s index, ``history`` (sorted) dropped, ``-1`` pads when the
        index returned fewer (:func:`index_builder.build.user_top_items`)."""
        source = self._engine._catalogue.sources[name]
        width = source.top_items.shape[1]
        labels = ann_search(source.index, query[None, :], min(width + len(history), len(source.index)), None)[0]
        labels = labels[labels >= 0]
        if len(history):
            at = np.minimum(np.searchsorted(history, labels), len(history) - 1)
            labels = labels[history[at] != labels]
        row = np.full((1, width), -1, np.int64)
        row[0, : min(width, len(labels))] = labels[:width]
        return row

    # ------------------------------------------------------------ record
    def record(self, events, persist: bool = True) -> Recorded:
        """Record a batch of events (see :mod:`engine.data.feedback`): validated whole,
        appended to the root's log (durable before this returns, with ``persist`` and an
        engine loaded from a bundle root), and applied, so the next request of each user
        sees them. Raises :class:`~engine.errors.InvalidRequest` for a bad event and
        :class:`~engine.errors.UnknownIdError` for an item the catalogue does not hold;
        either way nothing is recorded."""
        engine = self._engine
        batch = checked_events(events, self.config, engine.config.max_id_length)
        items = engine._catalogue.items.indices_or_missing(batch.item_ids)
        if (items < 0).any():
            unknown = [i for i, at in zip(batch.item_ids, items.tolist()) if at < 0]
            raise UnknownIdError(
                f"unknown item id(s) {shorten(unknown[:5])}: events are of catalogue items (add new items first)"
            )
        with self._lock:
            if persist and self.path is not None:
                _, self._offset = journal.append(
                    self.path, batch.encode(), fsync=self.config.fsync == "batch", before=self._catch_up
                )
            return self._apply(batch, items)

    def _catch_up(self, fd: int, size: int) -> None:
        """Under the log's lock, before this process's lines land: apply the lines other
        processes appended since this one last read (the log's order is every process's)."""
        self._resume_within(size)
        if size > self._offset:
            assert self.path is not None
            data = os.pread(fd, size - self._offset, self._offset)
            self._apply_logged(parse_log(self.path, data, self._offset))
            self._offset = size

    def sync(self, on_load: bool = False) -> int:
        """Apply the events appended to the root's log since this engine last read it (by
        the other processes of the root, or before a restart); returns how many. A
        partial last line is left for the next read: ``on_load``, it is said in a warning
        (a crash cut that write short; the next write cuts it off)."""
        if self.path is None:
            return 0
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            self._resume_within(size)
            data, end = journal.read_bytes(self.path, self._offset)
            if on_load and size > end:
                log.warning(
                    json.dumps({"event": "feedback_partial_line_skipped", "file": str(self.path), "bytes": size - end})
                )
            if not data:
                return 0
            events = parse_log(self.path, data, self._offset)
            self._offset = end
            return self._apply_logged(events)

    def _resume_within(self, size: int) -> None:
        """A log shorter than what this engine has read was replaced or cut behind its
        back: say so, and go on from its end."""
        if size < self._offset:
            log.warning(json.dumps({"event": "feedback_log_shrank", "file": str(self.path), "read": self._offset}))
            self._offset = size

    def _apply_logged(self, events: FeedbackEvents) -> int:
        """Apply events read from the log: those of items this engine does not serve (yet:
        it first serves the items other processes added) or of kinds it does not accept
        are logged and skipped."""
        if not len(events):
            return 0
        engine = self._engine
        items = engine._catalogue.items.indices_or_missing(events.item_ids)
        if (items < 0).any():
            engine.live_items.sync()
            items = engine._catalogue.items.indices_or_missing(events.item_ids)
        keep = (items >= 0) & np.array([kind in self._kind_code for kind in events.kinds], bool)
        if not keep.all():
            self.skipped += int((~keep).sum())
            log.warning(
                json.dumps(
                    {
                        "event": "feedback_events_skipped",
                        "file": str(self.path),
                        "count": int((~keep).sum()),
                        "reason": "unknown item or kind",
                    }
                )
            )
            events, items = events.take(keep), items[keep]
        return self._apply(events, items).events

    def _apply(self, events: FeedbackEvents, items: np.ndarray) -> Recorded:
        """Append checked events (``items``: their item indices) to the arrays. Under the lock."""
        m, start = len(events), self.n_events
        bundle_users = self._users.indices_or_missing(events.user_ids)
        live = np.empty(m, np.int64)
        new_users = 0
        for j, (user_id, bundle_user) in enumerate(zip(events.user_ids, bundle_users.tolist())):
            at = self._live_of_bundle_user[bundle_user] if bundle_user >= 0 else self._new_users.get(user_id, -1)
            if at < 0:
                at = self._new_live_user(bundle_user)
                if bundle_user >= 0:
                    self._live_of_bundle_user[bundle_user] = at
                else:
                    self._new_users[user_id] = at
                    new_users += 1
            live[j] = at
        self._reserve(start + m)
        rows = slice(start, start + m)
        self._item[rows] = items
        self._value[rows], self._time[rows] = events.values, events.timestamps
        self._kind[rows] = [self._kind_code[kind] for kind in events.kinds]
        for row, at in enumerate(live.tolist(), start):
            self._previous[row] = self._last[at]
            self._last[at] = row
            self._states.pop(at, None)
        self.n_events = start + m
        return Recorded(m, new_users)

    def _new_live_user(self, bundle_user: int) -> int:
        at = self.n_users
        if at == len(self._last):
            size = max(64, 2 * at)
            self._last = _grown(self._last, size, -1)
            self._bundle_user = _grown(self._bundle_user, size, -1)
        self._last[at], self._bundle_user[at] = -1, bundle_user
        self.n_users = at + 1
        return at

    def _reserve(self, n: int) -> None:
        if n <= len(self._item):
            return
        size = max(1024, 2 * len(self._item), n)
        self._item = _grown(self._item, size, 0)
        self._value, self._kind = _grown(self._value, size, np.nan), _grown(self._kind, size, 0)
        self._time, self._previous = _grown(self._time, size, 0), _grown(self._previous, size, -1)


def _grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full(size, fill, array.dtype)
    out[: len(array)] = array
    return out
