"""A request's users as rows of a :class:`~engine.serving.retrieval.Requests`: what the
bundle knows of its users (CF and tower vectors, seen items, recent likes, segments), and
how a request's user becomes a row — a known user from those tables, a new user from
features, a user with ratings by CF fold-in — with the request's user values checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.data.dataset import liked_mask
from engine.errors import InvalidRequest, shorten
from engine.index.bundle import LoadedBundle
from engine.models.cf import CFModel
from engine.models.features import segment_labels
from engine.models.towers import TwoTowerModel
from engine.serving.catalogue import Catalogue, read_only
from engine.serving.features import shrunk_mean
from engine.serving.retrieval import Requests, UserQueries
from engine.settings import EngineConfig

if TYPE_CHECKING:
    from engine.serving.feedback import LiveFeedback

# Shared one-user values of a known user's request (read-only: never written).
_TRUE, _FALSE = read_only(np.ones(1, bool)), read_only(np.zeros(1, bool))
_ZERO = read_only(np.zeros(1, np.float32))
_UNKNOWN_USER = read_only(np.full(1, -1, np.int64))  # Requests.users of a lone user the bundle does not know
_NO_ITEMS = read_only(np.zeros(0, np.int64))

# How a request's user is known, said in every recommendation (Recommendations.served_by):
KNOWN = "known user"  # a user of the bundle: their stored vectors, history and tables
FOLD_IN = "fold-in"  # ratings given with the request: a CF vector fitted to them
FEATURES = "features"  # a new user described by features: the user tower, their segment
POPULARITY = "popularity"  # an unknown user with nothing given: popularity (cold start)
LIVE = "live events"  # a user with events recorded since the build: their whole history (CF by fold-in)
_SERVED_KNOWN = (KNOWN,)
_SERVED_LIVE = (LIVE,)
_FIRST_ROW = read_only(np.zeros(1, np.int64))  # a live user's row in their own top-items table


class UserContext:
    """The bundle's users, and the user side of every request."""

    def __init__(self, published: LoadedBundle, cf: CFModel, towers: TwoTowerModel, config: EngineConfig):
        self.cf, self.towers, self.config = cf, towers, config
        layout = published.layout
        self.users = published.users
        # Likes follow the data's rule (bundles from before it was recorded: explicit).
        self.implicit = published.manifest.dataset.implicit
        self.seen_indptr, self.seen_indices = layout.load_table("seen_indptr"), layout.load_table("seen_indices")
        self.recent = layout.load_table("recent_liked")
        # Each user's (shrunk) share of likes; NaN for bundles built before the table.
        rates = layout.load_table("user_like_rate", optional=True)
        self.like_rate = np.full(len(self.users), np.nan, np.float32) if rates is None else rates
        self.mean_like_rate = float(np.nanmean(self.like_rate)) if len(self.like_rate) else 0.0
        self.segment_values: dict[str, np.ndarray] = {}
        # Each user's segment per key, a column each (-1 where the label is empty: "" zip code, ...).
        segments = published.manifest.segments
        self.user_segments = np.full((len(self.users), len(segments)), -1, np.int64)
        for j, key in enumerate(segments):
            self.segment_values[key] = layout.load_segment(key, "values")
            of_user = layout.load_segment(key, "user")
            self.user_segments[:, j] = np.where(self.segment_values[key][of_user] != "", of_user, -1)
        # The embedding models the request's users are queries of, in ranking order. A
        # model knows the bundle's first len(model.users) users (CF may know fewer).
        self.models = {model.name: model for model in (towers, cf)}
        # Known users' queries and biases of every model, computed once: a request then
        # only looks its rows up.
        self.user_queries = {name: m.retrieval_user_vectors(np.arange(len(m.users))) for name, m in self.models.items()}
        self.user_biases = {name: m.user_biases(np.arange(len(m.users))) for name, m in self.models.items()}
        # Users with events recorded live (engine.serving.feedback; the engine sets it).
        self.feedback: LiveFeedback | None = None
        self._user_rows = read_only(np.arange(len(self.users)))  # a lone user's top_rows entry is a view
        # A known user's request holds views of these tables (see known_user): read-only,
        # so nothing can write through them.
        for table in (*self.user_queries.values(), *self.user_biases.values()):
            read_only(table)
        for table in (self.recent, self.user_segments, self.seen_indices, self.like_rate):
            read_only(table)
        # A lone known user's row of a model that does not know them.
        self._unknown = {
            name: UserQueries(read_only(np.zeros((1, q.shape[1]), np.float32)), _ZERO, _FALSE)
            for name, q in self.user_queries.items()
        }

    @property
    def user_tower_vectors(self) -> np.ndarray:
        """Known users' user-tower outputs."""
        return self.user_queries[self.towers.name]

    def requests(
        self,
        cat: Catalogue,
        user_ids: Sequence,
        exclude_seen: bool,
        item_mask: np.ndarray,
        user_features: Mapping | None = None,
        ratings: Mapping[object, float] | None = None,
    ) -> Requests:
        """The retrieval and ranking context of many users, under the request's item mask
        (shared, not modified). Known users are looked up in the bundle's tables all at
        once; ``user_features`` / ``ratings`` (cold start, fold-in) are for a single user."""
        n = len(user_ids)
        if (user_features or ratings) and n != 1:
            raise InvalidRequest("user_features and ratings describe one user")
        encoded = self.encoded_user_features(user_features) if user_features else None
        if n == 1 and not ratings and user_ids[0] is not None:
            lone = self.users.get(user_ids[0])
            lone_live = -1 if self.feedback is None else self.feedback.live_index(user_ids[0], lone)
            if lone_live >= 0 and (lone is not None or not user_features):
                return self.live_user(cat, lone_live, lone, exclude_seen, item_mask)
            if lone is not None:
                return self.known_user(cat, lone, exclude_seen, item_mask)
        u = self.users.indices_or_missing(user_ids)
        known = u >= 0
        models = {}
        for name, queries in self.user_queries.items():
            has = known & (u < len(queries))
            vectors = np.zeros((n, queries.shape[1]), np.float32)
            bias = np.zeros(n, np.float32)
            vectors[has], bias[has] = queries[u[has]], self.user_biases[name][u[has]]
            models[name] = UserQueries(vectors, bias, has)
        recent = np.full((n, self.recent.shape[1]), -1, np.int64)
        recent[known] = self.recent[u[known]]
        at = np.where(known, u, 0)
        like_rate = np.where(known, self.like_rate[at], np.nan).astype(np.float32)
        user_segments = np.where(known[:, None], self.user_segments[at], -1)
        segments = {key: user_segments[:, j] for j, key in enumerate(self.segment_values)}
        # Seen items: each known user's slice of the bundle's CSR history. (A lone known
        # user without ratings, the common request, takes known_user instead.)
        starts = np.where(known, self.seen_indptr[at], 0)
        lengths = np.where(known, self.seen_indptr[at + 1] - starts, 0)
        history_indptr = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=history_indptr[1:])
        history = self.seen_indices[
            np.repeat(starts - history_indptr[:-1], lengths) + np.arange(history_indptr[-1])
        ].astype(np.int64)
        served_by = np.where(known, KNOWN, POPULARITY).tolist()
        live = self.feedback.live_indices(user_ids, u) if self.feedback is not None else np.full(n, -1)
        if (live >= 0).any():  # users with events: their whole history instead of the tables
            history_indptr, history = self._live_users(
                live, models, recent, like_rate, served_by, history_indptr, history
            )
        indptr, excluded = (history_indptr, history) if exclude_seen else (np.zeros(n + 1, np.int64), _NO_ITEMS)
        # Known users' rows in the sources' top-items tables, which exclude the seen items
        # (not for users with events: their vector and seen items changed).
        top_rows = {name: np.where(m.has & (live < 0), u, -1) for name, m in models.items()} if exclude_seen else {}

        if n == 1 and not known[0] and user_features and encoded is not None:  # a new user by features
            for name, model in self.models.items():
                if model.embeds_from_features:
                    # The towers take the checked encoding, not a second transform.
                    if model is self.towers:
                        vector = self.towers.user_tower(encoded)[0]
                    else:
                        vector = model.cold_user_vectors([user_features])[0]
                    models[name].vectors[0], models[name].has[0] = vector, True
            served_by[0] = FEATURES
            for key, segment in self.segments_from_features(user_features).items():
                segments[key][0] = segment
        if ratings:  # CF fold-in for this request
            items, values = self.checked_ratings(ratings)
            folded = self.cf.fold_in(items, values)
            if not (np.isfinite(folded.vector).all() and np.isfinite(folded.bias)):
                raise InvalidRequest("the ratings are out of range: their fold-in gives no finite CF vector")
            cf = models[self.cf.name]
            cf.vectors[0], cf.bias[0], cf.has[0] = self.cf.fold_in_query(folded), folded.bias, True
            served_by[0] = FOLD_IN
            top_rows = {}  # another vector, and more items excluded, than the tables assume
            history = np.union1d(history, cat.items.indices(items))
            history_indptr = np.array([0, len(history)], np.int64)
            if exclude_seen:
                indptr, excluded = history_indptr, history
            likes = liked_mask(np.array(values), self.implicit)
            like_rate[0] = shrunk_mean(likes.sum(), len(likes), self.mean_like_rate)  # as the bundle's users
            liked = [cat.items.index(i) for i, like in zip(items, likes) if like][::-1]
            recent = np.full((1, max(len(liked), 1)), -1, np.int64)
            recent[0, : len(liked)] = liked
        return Requests(
            item_mask,
            indptr,
            excluded,
            models,
            recent,
            segments,
            filtered=item_mask is not cat.every_item,
            top_rows=top_rows,
            served_by=served_by,
            history_indptr=history_indptr,
            history_indices=history,
            like_rate=like_rate,
            users=np.where(known, u, -1),
        )

    def _live_users(
        self,
        live: np.ndarray,
        models: dict[str, UserQueries],
        recent: np.ndarray,
        like_rate: np.ndarray,
        served_by: list,
        history_indptr: np.ndarray,
        history: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rewrite the rows of users with live events (``live[row] >= 0``) in place: their
        fold-in CF vector, recent likes, like rate and whole history. Returns the
        history CSR ``(indptr, indices)`` with their rows replaced."""
        assert self.feedback is not None
        cf = models[self.cf.name]
        rows = [history[history_indptr[r] : history_indptr[r + 1]] for r in range(len(live))]
        for row in np.flatnonzero(live >= 0).tolist():
            state = self.feedback.user(int(live[row]))
            cf.vectors[row], cf.bias[row], cf.has[row] = state.cf_query[0], state.cf_bias[0], True
            recent[row], like_rate[row], served_by[row] = state.recent[0], state.like_rate[0], LIVE
            rows[row] = state.history
        indptr = np.zeros(len(live) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        return indptr, np.concatenate(rows).astype(np.int64)

    def checked_ratings(self, ratings: Mapping[object, float]) -> tuple[list, list[float]]:
        """A request's ``{item_id: rating}`` as ids and finite float ratings."""
        items, values = list(ratings.keys()), []
        for item, rating in ratings.items():
            try:
                value = float(rating)
            except (TypeError, ValueError):
                raise InvalidRequest(
                    f"rating of item {shorten(item)} must be a number, got {shorten(rating)}"
                ) from None
            if not np.isfinite(value):
                raise InvalidRequest(f"ratings must be finite numbers; not for item {shorten(item)}")
            values.append(value)
        return items, values

    def encoded_user_features(self, features: Mapping) -> np.ndarray:
        """A request's user features as the user tower's input ``[1, d]``, checked: names
        the tower does not know, or values it cannot encode, are refused even for a
        known user (whose stored vector is used). A new user's vector is computed from
        this encoding, not from a second one."""
        self.config.check_texts(features.values(), "user feature value")
        return self.towers.user_pipeline.transform_dicts([dict(features)])

    def known_user(self, cat: Catalogue, u: int, exclude_seen: bool, item_mask: np.ndarray) -> Requests:
        """:meth:`requests` for one known user (the common request): read-only views of
        the bundle's rows instead of copies, so it costs a handful of slices."""
        row = slice(u, u + 1)
        seen = self.seen_indices[self.seen_indptr[u] : self.seen_indptr[u + 1]]
        excluded = seen if exclude_seen else _NO_ITEMS
        models = {
            name: UserQueries(queries[row], self.user_biases[name][row], _TRUE)
            if u < len(queries)
            else self._unknown[name]
            for name, queries in self.user_queries.items()
        }
        return Requests(
            item_mask,
            np.array([0, len(excluded)]),
            excluded.astype(np.int64),
            models,
            self.recent[row],
            {key: self.user_segments[row, j] for j, key in enumerate(self.segment_values)},
            filtered=item_mask is not cat.every_item,
            top_rows=self._top_rows(row, models, exclude_seen),
            served_by=_SERVED_KNOWN,
            history_indptr=None if exclude_seen else np.array([0, len(seen)]),
            history_indices=None if exclude_seen else seen,
            like_rate=self.like_rate[row],
            users=self._user_rows[row],
        )

    def live_user(
        self, cat: Catalogue, live: int, u: int | None, exclude_seen: bool, item_mask: np.ndarray
    ) -> Requests:
        """:meth:`requests` for one user with live events (``u``: their bundle index, None
        for a new user): their :class:`~engine.serving.feedback.LiveUser` state instead of
        the bundle's per-user tables, searched once per change of their history."""
        assert self.feedback is not None
        state = self.feedback.user(live)
        known = u is not None
        row = slice(u, u + 1) if u is not None else slice(0, 1)
        models = {}
        for name, queries in self.user_queries.items():
            if name == self.cf.name:
                models[name] = UserQueries(state.cf_query, state.cf_bias, _TRUE)
            elif u is not None and u < len(queries):
                models[name] = UserQueries(queries[row], self.user_biases[name][row], _TRUE)
            else:
                models[name] = self._unknown[name]
        segments = {
            key: self.user_segments[row, j] if known else np.full(1, -1, np.int64)
            for j, key in enumerate(self.segment_values)
        }
        tables = state.top_items if exclude_seen else {}
        return Requests(
            item_mask,
            np.array([0, len(state.history) if exclude_seen else 0]),
            state.history if exclude_seen else _NO_ITEMS,
            models,
            state.recent,
            segments,
            filtered=item_mask is not cat.every_item,
            top_rows={name: _FIRST_ROW for name in tables},
            top_tables=tables,
            served_by=_SERVED_LIVE,
            history_indptr=None if exclude_seen else np.array([0, len(state.history)]),
            history_indices=None if exclude_seen else state.history,
            like_rate=state.like_rate,
            users=self._user_rows[row] if known else _UNKNOWN_USER,
        )

    def _top_rows(self, row: slice, models: dict[str, UserQueries], exclude_seen: bool) -> dict[str, np.ndarray]:
        """A lone known user's ``Requests.top_rows``: views of their row number, for the
        models that know them, where the tables apply (they drop seen items, so only
        when the request does)."""
        if not exclude_seen:
            return {}
        at = self._user_rows[row]
        return {name: at for name, m in models.items() if m.has is _TRUE}

    def segments_from_features(self, features: Mapping) -> dict[str, int]:
        """Segment indices of a new user, by the same rules as the bundle's users."""
        columns = {
            name: np.array([value])
            for name, value in features.items()
            if name in ("zip_code", "age", *self.segment_values)
        }
        if "age" in columns:
            columns["age"] = np.array([float(features["age"]) if features["age"] not in (None, "") else np.nan])
        labels = {}
        for key, values in self.segment_values.items():
            label = str(segment_labels(key, columns, 1)[0])
            at = int(np.searchsorted(values, label))
            if label and at < len(values) and values[at] == label:
                labels[key] = at
        return labels
