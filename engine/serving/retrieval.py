"""Candidate retrieval for a batch of users: named sources, each proposing item indices
for every user of a batch at once, and their merge with per-source quotas.

Everything here is batch-first. :class:`Requests` holds ``U`` users (row ``u`` is one
user), a source proposes for all of them in a few NumPy and vector-index calls and returns
:class:`Proposals` — flat ``rows`` and ``items`` arrays, grouped by row, best first
within a row — so a batch costs no Python per user. A single request is a batch of one.

What a user may be shown is ``item_mask`` (block-list, allow-list and attribute
filters, shared by the batch) minus the user's own ``excluded`` items (seen items). ANN
sources pass the mask to the vector index as its ``allowed`` bitmap
(:mod:`engine.index.vector_index`) so that filtering happens *inside* the search and a
full quota still comes back when enough items qualify: a
batch of one searches with its exact mask; a larger batch searches with the shared mask
(none without filters) for ``quota + the most items any of its users excludes`` and
drops each user's own exclusions afterwards (a user still left short is searched alone).
Most requests search nothing at all: a known user's ANN lists and their likes'
neighbours come from tables the index builder searched (see :class:`ModelSource` and
:class:`RecentNeighboursSource`), filtered by the same mask.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from engine.index.vector_index import Conditions, pack_mask

# Batches check exclusions in a U x n_items bitmap up to this size (64 MiB), beyond it by
# binary search: memory stays bounded whatever the catalogue.
EXCLUSION_BITMAP_BITS = 8 * 64 * 2**20
_LARGEST = np.iinfo(np.int64).max  # the sentinel after a user's sorted exclusions (Requests.excluded_of)


def positions_in_rows(rows: np.ndarray) -> np.ndarray:
    """Each entry's position within its row, for ``rows`` sorted ascending."""
    n = len(rows)
    if n == 0 or rows[0] == rows[-1]:  # one row (a lone request)
        return np.arange(n)
    starts = np.ones(n, bool)
    np.not_equal(rows[1:], rows[:-1], out=starts[1:])
    starts = np.flatnonzero(starts)
    return np.arange(n) - np.repeat(starts, np.diff(starts, append=n))


@dataclass
class UserQueries:
    """``U`` users as one embedding model (:class:`~engine.models.embedding.EmbeddingModel`)
    sees them: its score of (user ``u``, item ``i``) is ``vectors[u] . item_vectors[i] +
    bias[u]``, with the model's retrieval item vectors. ``has[u]`` says whether the model
    knows user ``u`` at all (the other rows hold zeros)."""

    vectors: np.ndarray  # [U, d] float32: queries of the model's inner-product index
    bias: np.ndarray  # [U] float32
    has: np.ndarray  # [U] bool


@dataclass
class Requests:
    """The retrieval context of ``U`` users: per model, the users' queries (``models``),
    and what every source shares (masks, exclusions, likes, segments)."""

    item_mask: np.ndarray  # [n_items] bool: the batch's filters
    excluded_indptr: np.ndarray  # [U + 1] CSR rows of the item indices each user excludes
    excluded_indices: np.ndarray
    models: dict[str, UserQueries]  # model name ("cf", "towers") -> the users' queries
    recent_liked: np.ndarray  # [U, R] item indices, latest first, -1 pads
    segments: dict[str, np.ndarray] = field(default_factory=dict)  # key -> [U] segment, -1 unknown
    filtered: bool = True  # False: item_mask allows every item (no filters), so it need not be read
    # Source name -> [U] each user's row in that source's table of users' top items (-1:
    # none). Set only where the row applies: the user's stored vector is the query, and
    # the user excludes exactly their seen items, as the table does (see ModelSource).
    top_rows: dict[str, np.ndarray] = field(default_factory=dict)
    # Source name -> a table of top items that replaces the source's own for this request
    # (its rows are what top_rows index): a lone user with live events, whose rows were
    # searched for their new vector and history (engine.serving.feedback).
    top_tables: dict[str, np.ndarray] = field(default_factory=dict)
    # How each user is known (SERVED_BY): the path that serves them, said in every result.
    served_by: Sequence[str] = ()
    # Each user's history as CSR rows (their training items, plus the items rated with
    # the request), whether or not the request excludes them: what the learned ranker's
    # user features read (engine.serving.features). None: the same as the exclusions.
    history_indptr: np.ndarray | None = None
    history_indices: np.ndarray | None = None
    # [U] float32: each user's share of likes among their interactions (NaN unknown).
    like_rate: np.ndarray | None = None
    # [U] int64: each user's index in the bundle, -1 for a user it does not know.
    users: np.ndarray | None = None
    # The request's attribute filters and their mask (item_mask includes them), for
    # vector backends that search with them natively (engine.index.vector_index.Conditions).
    conditions: Conditions | None = None

    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.excluded_indptr) - 1

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, indices)``: each user's history (see ``history_indptr``)."""
        if self.history_indptr is None or self.history_indices is None:
            return self.excluded_indptr, self.excluded_indices
        return self.history_indptr, self.history_indices

    @property
    def n_excluded(self) -> np.ndarray:
        return np.diff(self.excluded_indptr)

    def allowed(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether user ``rows[j]`` may be shown item ``items[j]`` (valid indices only)."""
        ok = self.item_mask[items] if self.filtered else np.ones(len(items), bool)
        if not len(self.excluded_indices) or not len(items):
            return ok
        n = len(self.item_mask)
        if len(self) * n <= EXCLUSION_BITMAP_BITS:
            # Each user's exclusions as a bitmap (U x n_items bits): one lookup per pair.
            if "excluded_bits" not in self._cache:
                bits = np.zeros((len(self), (n + 7) // 8), np.uint8)
                # (Row u's item i is bit u * 8 * row bytes + i of the rows laid end to end.)
                set_bits(bits.reshape(-1), self._owners() * (8 * bits.shape[1]) + self.excluded_indices, True)
                self._cache["excluded_bits"] = bits
            bits = self._cache["excluded_bits"]
            return ok & ((bits[rows, items >> 3] >> (items & 7).astype(np.uint8)) & 1 == 0)
        # Huge catalogues: binary search in the sorted (user, item) keys instead.
        if "excluded_keys" not in self._cache:
            self._cache["excluded_keys"] = np.sort(self._owners() * n + self.excluded_indices)
        keys, wanted = self._cache["excluded_keys"], rows.astype(np.int64) * n + items
        return ok & (keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] != wanted)

    def _owners(self) -> np.ndarray:
        """The row of each entry of ``excluded_indices``."""
        return np.repeat(np.arange(len(self)), self.n_excluded)

    def excluded_of(self, u: int) -> np.ndarray:
        """The items user ``u`` excludes, sorted, then one sentinel larger than any item
        (so that a binary search for an item always lands on a valid position)."""
        key = ("excluded", u)
        if key not in self._cache:
            excluded = self.excluded_indices[self.excluded_indptr[u] : self.excluded_indptr[u + 1]]
            padded = np.empty(len(excluded) + 1, np.int64)
            padded[:-1], padded[-1] = excluded, _LARGEST
            padded[:-1].sort()
            self._cache[key] = padded
        return self._cache[key]

    def allowed_of(self, u: int, items: np.ndarray) -> np.ndarray:
        """Whether user ``u`` may be shown each of ``items`` (valid indices). Reads only
        those items' entries: a lone request never touches a whole ``[n_items]`` mask."""
        excluded = self.excluded_of(u)
        if len(excluded) == 1:
            return self.item_mask[items] if self.filtered else np.ones(len(items), bool)
        ok = excluded[np.searchsorted(excluded, items)] != items
        return ok & self.item_mask[items] if self.filtered else ok

    def filter_bits(self) -> np.ndarray | None:
        """The batch's filters as a little-endian packed bitmap (packed once), None
        without filters."""
        if self.filtered and "filter_bits" not in self._cache:
            self._cache["filter_bits"] = pack_mask(self.item_mask)
        return self._cache.get("filter_bits")

    def user_bitmap(self, u: int, out: np.ndarray) -> np.ndarray:
        """User ``u``'s mask as a little-endian packed bitmap, written into ``out``: the
        filters' bits (all set without filters) with the user's excluded items cleared."""
        shared = self.filter_bits()  # None exactly when the batch has no filters
        if shared is not None:
            np.copyto(out, shared)
        else:
            out.fill(255)
        set_bits(out, self.excluded_of(u)[:-1], False)
        return out

    def _needs_own_bitmap(self, u: int) -> bool:
        """Whether user ``u``'s mask differs from "every item": filters or exclusions."""
        return self.filter_bits() is not None or self.excluded_indptr[u + 1] > self.excluded_indptr[u]

    def lone_bitmap(self) -> np.ndarray | None:
        """A lone request's mask as its thread's packed bitmap (see :class:`_ThreadBitmap`),
        or None when it may see every item."""
        return _THREAD_BITMAP.bitmap(self) if self._needs_own_bitmap(0) else None

    def allowed_bits(self, u: int | None = None) -> np.ndarray | None:
        """The ``allowed`` filter of a vector search (a packed bitmap, see
        :mod:`engine.index.vector_index`): user ``u``'s mask — the filters' bits with the
        user's excluded items cleared, no whole-catalogue mask copied — or, ``u`` None,
        the batch's shared filters. None when every item is allowed. A lone request's
        bitmap is its thread's buffer, reused from request to request, so that the index
        reuses its search objects too."""
        if u is None or not self._needs_own_bitmap(u):
            return self.filter_bits()
        if len(self) == 1:
            return _THREAD_BITMAP.bitmap(self)
        key = ("bits", u)
        if key not in self._cache:
            self._cache[key] = self.user_bitmap(u, np.empty((len(self.item_mask) + 7) // 8, np.uint8))
        return self._cache[key]


class _ThreadBitmap(threading.local):
    """Per thread, one item bitmap reused by every lone request the thread serves,
    filled with a request's mask at that request's first search (requests on one thread
    run one after another). Reusing the buffer lets the vector index reuse the search
    objects it built over it (see ``engine.index.faiss_index``)."""

    def __init__(self):
        self.bits = np.zeros(0, np.uint8)
        self.holds: object = None  # the token of the request whose mask the bitmap holds
        # When that request had no filters, its exclusions (its bitmap is every item but
        # those): the next such request restores only their bits instead of rewriting
        # the whole bitmap (12.5 kB per 100k items, on every request).
        self.every_item_but: np.ndarray | None = None

    def bitmap(self, requests: Requests) -> np.ndarray:
        """The thread's bitmap, holding the lone request's mask."""
        n_bytes = (len(requests.item_mask) + 7) // 8
        if len(self.bits) != n_bytes:  # first use, or a catalogue of another size
            self.bits, self.holds, self.every_item_but = np.empty(n_bytes, np.uint8), None, None
        # A token, not the request itself: the thread keeps no request (nor the engine
        # tables its views point into) alive after it is served.
        token = requests._cache.setdefault("bitmap_token", object())
        if self.holds is not token:
            unfiltered = requests.filter_bits() is None
            excluded = requests.excluded_of(0)[:-1]
            if unfiltered and self.every_item_but is not None:
                set_bits(self.bits, self.every_item_but, True)
                set_bits(self.bits, excluded, False)
            else:
                requests.user_bitmap(0, self.bits)
            self.every_item_but = excluded if unfiltered else None
            self.holds = token
        return self.bits


_THREAD_BITMAP = _ThreadBitmap()


@njit(cache=True)
def set_bits(bits: np.ndarray, items: np.ndarray, value: bool) -> None:  # pragma: no cover - compiled
    """Set (``value`` True) or clear the bit of each of ``items`` in the little-endian
    packed bitmap ``bits``."""
    for item in items:
        if value:
            bits[item >> 3] |= np.uint8(1 << (item & 7))
        else:
            bits[item >> 3] &= np.uint8(255 - (1 << (item & 7)))


@dataclass
class Proposals:
    """Items proposed by one source: flat ``rows`` (non-decreasing) and ``items``, best
    first within each row."""

    rows: np.ndarray  # [n] int64
    items: np.ndarray  # [n] int64

    @classmethod
    def empty(cls) -> Proposals:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def of_one(cls, items) -> Proposals:
        """One user's list (row 0)."""
        items = np.asarray(items, np.int64)
        return cls(np.zeros(len(items), np.int64), items)

    def counts(self, n_rows: int) -> np.ndarray:
        return np.bincount(self.rows, minlength=n_rows)

    @classmethod
    def union(cls, parts: list[Proposals]) -> Proposals:
        """The proposals of disjoint sets of rows, as one."""
        rows = np.concatenate([p.rows for p in parts])
        order = np.argsort(rows, kind="stable")
        return cls(rows[order], np.concatenate([p.items for p in parts])[order])

    def replace_rows(self, replacements: dict[int, np.ndarray]) -> Proposals:
        """These proposals with some rows' lists replaced."""
        if not replacements:
            return self
        keep = ~np.isin(self.rows, list(replacements))
        rows = np.concatenate([self.rows[keep]] + [np.full(len(v), u, np.int64) for u, v in replacements.items()])
        items = np.concatenate([self.items[keep]] + [np.asarray(v, np.int64) for v in replacements.values()])
        order = np.argsort(rows, kind="stable")
        return Proposals(rows[order], items[order])


def best_allowed(requests: Requests, rows: np.ndarray, ranked: np.ndarray, quota: np.ndarray) -> Proposals:
    """Each user's first ``quota[u]`` allowed items of a ranked list: ``ranked[j]`` is the
    list (``-1`` pads) of user ``rows[j]`` (``rows`` ascending)."""
    flat_rows = np.repeat(rows.astype(np.int64), ranked.shape[1])
    flat = np.asarray(ranked, np.int64).ravel()
    keep = flat >= 0
    keep[keep] = requests.allowed(flat_rows[keep], flat[keep])
    flat_rows, flat = flat_rows[keep], flat[keep]
    take = positions_in_rows(flat_rows) < quota[flat_rows]
    return Proposals(flat_rows[take], flat[take])


def ann_search(
    index, queries: np.ndarray, k: int, allowed: np.ndarray | None, conditions: Conditions | None = None
) -> np.ndarray:
    """Labels ``[n, k]`` of the top ``k`` allowed items of a
    :class:`~engine.index.vector_index.VectorIndex` (``-1`` pads): every search of the
    retrieval sources goes through here (``conditions``: the request's attribute filters
    ``allowed`` includes, for backends that search with them natively)."""
    return index.search(queries, int(k), allowed, conditions)[1]


class Source:
    """A named candidate source: ``propose`` gives each user ``quota[u]`` items (fewer
    when fewer qualify; none where ``quota[u]`` is 0, which it must be for users the
    source is not ``available`` to, as the engine's quotas are).

    Subclasses implement both ``propose_many`` (the batch in a few array operations)
    and ``propose_alone`` (one user with their exact mask): a lone request takes the
    latter, which costs fewer calls, and so do a batch's users that the batched
    operations left short (heavy filters)."""

    name = "source"

    def available(self, requests: Requests) -> np.ndarray:
        """``[U]`` bool: users this source can serve."""
        return np.ones(len(requests), bool)

    def available_alone(self, requests: Requests) -> bool:
        """``available`` for a lone request (user 0), without building arrays."""
        return True

    def propose(self, requests: Requests, quota: np.ndarray) -> Proposals:
        if len(requests) == 1:
            if quota[0] <= 0:
                return Proposals.empty()
            return Proposals.of_one(self.propose_alone(requests, 0, int(quota[0])))
        rows = np.flatnonzero(quota > 0)
        if len(rows) == 0:
            return Proposals.empty()
        return self.propose_many(requests, rows, quota)

    def propose_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        """Proposals for users ``rows`` (available, with a quota)."""
        raise NotImplementedError

    def propose_alone(self, requests: Requests, u: int, k: int) -> np.ndarray:
        """User ``u``'s first ``k`` items, best first."""
        raise NotImplementedError

    def _fill_short(
        self,
        requests: Requests,
        rows: np.ndarray,
        quota: np.ndarray,
        found: Proposals,
        may_have_more: np.ndarray | bool = True,
    ) -> Proposals:
        """``found`` with the users it left short (where more may qualify) served alone."""
        short = rows[(found.counts(len(requests))[rows] < quota[rows]) & may_have_more]
        return found.replace_rows({int(u): self.propose_alone(requests, int(u), int(quota[u])) for u in short})


class ModelSource(Source):
    """ANN over one embedding model's inner-product index, queried with the users'
    vectors of that model (``Requests.models[name]``): "ANN over model M". The source is
    named after its model (``cf``: the ``cf_ip`` index of ``[x, offset]`` per item,
    queried with ``[w, 1]``; ``towers``: the item-tower vectors, queried with the
    user-tower outputs).

    With ``top_items`` (``[n_users, K]``, from ``index_builder.build.user_top_items``),
    a user whose request has a row there (``Requests.top_rows``) is served that row's
    first ``k`` items that pass the request's filters, without a search: the row is what
    this index returns for the user's stored vector, seen items dropped. A row shorter
    than ``K`` (``-1`` pads) holds all the index returned (a tiny catalogue, or an HNSW
    graph that reaches no more from that vector), so it answers an unfiltered request as
    it is. The user searches the index only when the filters leave fewer than ``k`` of
    the row's items (a search with the filters inside may reach others), or when ``k``
    exceeds ``K``."""

    def __init__(self, name: str, index, top_items: np.ndarray | None = None):
        self.name, self.index, self.top_items = name, index, top_items

    def available(self, requests: Requests) -> np.ndarray:
        return requests.models[self.name].has

    def available_alone(self, requests: Requests) -> bool:
        return bool(requests.models[self.name].has[0])

    def queries(self, requests: Requests) -> np.ndarray:
        return requests.models[self.name].vectors

    def propose_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        top, at = requests.top_tables.get(self.name, self.top_items), requests.top_rows.get(self.name)
        tabled = np.zeros(len(rows), bool)
        if top is not None and at is not None:
            tabled = (at[rows] >= 0) & (quota[rows] <= top.shape[1])
        found = []
        if top is not None and at is not None and tabled.any():
            listed = rows[tabled]
            table = top[at[listed]]
            # Rows the filters left short are searched (alone), as propose_alone does.
            found.append(
                self._fill_short(
                    requests,
                    listed,
                    quota,
                    best_allowed(requests, listed, table, quota),
                    (table[:, -1] >= 0) | requests.filtered,
                )
            )
        if not tabled.all():
            found.append(self._search_many(requests, rows[~tabled], quota))
        return found[0] if len(found) == 1 else Proposals.union(found)

    def _search_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        width = int(min(quota[rows].max() + requests.n_excluded[rows].max(), len(self.index)))
        labels = ann_search(
            self.index, self.queries(requests)[rows], width, requests.allowed_bits(), requests.conditions
        )
        # A user whose exclusions crowded a full result list is searched alone.
        return self._fill_short(requests, rows, quota, best_allowed(requests, rows, labels, quota), labels[:, -1] >= 0)

    def propose_alone(self, requests: Requests, u: int, k: int) -> np.ndarray:
        top, at = requests.top_tables.get(self.name, self.top_items), requests.top_rows.get(self.name)
        if top is not None and at is not None and at[u] >= 0 and k <= top.shape[1]:
            row = top[at[u]]
            full = row[-1] >= 0
            listed = row if full else row[row >= 0]
            if requests.filtered:
                listed = listed[requests.item_mask[listed]]
            if len(listed) >= k or not (full or requests.filtered):
                return listed[:k]
        labels = ann_search(
            self.index, self.queries(requests)[u : u + 1], k, requests.allowed_bits(u), requests.conditions
        )[0]
        return labels[labels >= 0]


def _first_allowed(order: np.ndarray, allowed, k: int) -> np.ndarray:
    """The first ``k`` entries of a ranked item list that ``allowed(items) -> bool[]``
    keeps. Scans growing prefixes, so the usual case (few items excluded) touches only a
    few hundred entries."""
    found, n_found, start, width = [], 0, 0, max(4 * k, 256)
    while start < len(order) and n_found < k:
        part = order[start : start + width]
        found.append(part[allowed(part)])
        n_found, start, width = n_found + len(found[-1]), start + width, width * 4
    if len(found) == 1:
        return found[0][:k]
    return np.concatenate(found)[:k] if found else np.zeros(0, np.int64)


class PopularitySource(Source):
    """The most interacted-with items overall.

    The batch's filters leave one shared list; taking ``quota + the most items any user
    excludes`` of it leaves every user a full quota after their own exclusions."""

    name = "popular"

    def __init__(self, popularity: np.ndarray):
        self.order = np.argsort(-popularity, kind="stable")

    def propose_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        shared = _first_allowed(
            self.order,
            lambda items: requests.item_mask[items],
            int(quota[rows].max() + requests.n_excluded[rows].max()),
        )
        return best_allowed(requests, rows, np.broadcast_to(shared, (len(rows), len(shared))), quota)

    def propose_alone(self, requests: Requests, u: int, k: int) -> np.ndarray:
        return _first_allowed(self.order, lambda items: requests.allowed_of(u, items), k)


class SegmentSource(Source):
    """The most interacted-with items among users of the same segment (e.g. the same
    zip region, occupation or age band), from the bundle's ``[n_segments, top_n]`` table."""

    name = "segment"

    def __init__(self, key: str, top_items: np.ndarray):
        self.key, self.top_items = key, top_items

    def available(self, requests: Requests) -> np.ndarray:
        if self.key not in requests.segments:
            return np.zeros(len(requests), bool)
        return requests.segments[self.key] >= 0

    def available_alone(self, requests: Requests) -> bool:
        return self.key in requests.segments and requests.segments[self.key][0] >= 0

    def propose_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        width = int(min(self.top_items.shape[1], quota[rows].max() + requests.n_excluded[rows].max()))
        found = best_allowed(requests, rows, self.top_items[requests.segments[self.key][rows], :width], quota)
        # Filters may leave a user short within the scanned width: scan that user's whole row.
        return self._fill_short(requests, rows, quota, found, width < self.top_items.shape[1])

    def propose_alone(self, requests: Requests, u: int, k: int) -> np.ndarray:
        return _first_allowed(
            self.top_items[requests.segments[self.key][u]], lambda items: requests.allowed_of(u, items), k
        )


class RecentNeighboursSource(Source):
    """Squared-distance neighbours (CF item vectors) of the user's most recent likes,
    interleaved so every recent like contributes: the best neighbour of each like, then
    the second of each, ... (duplicates dropped), ``ceil(quota / likes)`` per like.

    Neighbours come from the bundle's precomputed ``neighbours`` table (``[n_items, m]``,
    nearest first, the item itself excluded, ``-1`` pads); a like whose table row runs out
    of allowed items (heavy filters) is searched live in the ``cf_l2`` index instead.
    """

    name = "recent"

    def __init__(self, index, item_vectors: np.ndarray, neighbours: np.ndarray | None = None):
        self.index, self.item_vectors = index, item_vectors
        self.neighbours = neighbours

    def available(self, requests: Requests) -> np.ndarray:
        return requests.recent_liked[:, 0] >= 0  # latest first, -1 pads: a user with likes has a first one

    def available_alone(self, requests: Requests) -> bool:
        return requests.recent_liked[0, 0] >= 0

    def propose_many(self, requests: Requests, rows: np.ndarray, quota: np.ndarray) -> Proposals:
        if self.neighbours is None:  # bundles built before the table: search every like live
            return self._fill_short(requests, rows, quota, Proposals.empty())
        liked = requests.recent_liked[rows]  # [r, R]
        per_like = -(-quota[rows] // (liked >= 0).sum(axis=1))
        table = self.neighbours[np.maximum(liked, 0)].astype(np.int64)  # [r, R, m]
        valid = (liked >= 0)[:, :, None] & (table >= 0)
        owner = np.broadcast_to(rows[:, None, None], table.shape)
        valid[valid] = requests.allowed(owner[valid], table[valid])
        rank = np.cumsum(valid, axis=2) - 1
        take = valid & (rank < per_like[:, None, None])
        # A like whose (full) table row has too few allowed neighbours needs a live search:
        # such users are served alone.
        ran_out = ((liked >= 0) & (take.sum(axis=2) < per_like[:, None]) & (table[:, :, -1] >= 0)).any(axis=1)
        r_at, like_at, col_at = np.nonzero(take & ~ran_out[:, None, None])
        order_key = rank[r_at, like_at, col_at] * liked.shape[1] + like_at  # round-robin over likes
        picked = _first_distinct(Proposals(rows[r_at], table[r_at, like_at, col_at]), order_key, quota)
        return picked.replace_rows({int(u): self.propose_alone(requests, int(u), int(quota[u])) for u in rows[ran_out]})

    def propose_alone(self, requests: Requests, u: int, k: int) -> np.ndarray:
        """One user's proposals, with live searches where the table runs short."""
        liked = requests.recent_liked[u]
        liked = liked[liked >= 0]
        per_like = -(-k // len(liked))
        if self.neighbours is not None:  # the table's rows of all likes at once
            table = self.neighbours[liked]
            ok = table >= 0
            ok[ok] = requests.allowed_of(u, table[ok])
            lists = [row[keep][:per_like] for row, keep in zip(table, ok)]
            exhausted = (table[:, -1] < 0).tolist()  # -1 pads: no more neighbours exist
        else:
            lists, exhausted = [np.zeros(0, np.int64)] * len(liked), [False] * len(liked)
        for at, i in enumerate(liked):
            if len(lists[at]) < per_like and not exhausted[at]:  # search live beyond the table
                labels = ann_search(
                    self.index,
                    self.item_vectors[i][None, :],
                    per_like + 1,
                    requests.allowed_bits(u),
                    requests.conditions,
                )[0]
                lists[at] = labels[(labels >= 0) & (labels != i)][:per_like]
        # Round-robin (the best neighbour of each like, then the second, ...), duplicates
        # dropped: a few dozen items, cheaper in plain Python than in NumPy calls.
        rounds = itertools.zip_longest(*(x.tolist() for x in lists))
        merged = dict.fromkeys(i for group in rounds for i in group if i is not None)
        return np.fromiter(merged, np.int64)[:k]


def _first_distinct(lists: Proposals, order_key: np.ndarray, quota: np.ndarray) -> Proposals:
    """Per row: the entries in ``order_key`` order, duplicates dropped, the first ``quota``."""
    if len(lists.rows) == 0:
        return lists
    by_item = np.lexsort((order_key, lists.items, lists.rows))
    rows, items = lists.rows[by_item], lists.items[by_item]
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (items[1:] != items[:-1])
    rows, items, key = rows[first], items[first], order_key[by_item][first]
    order = np.lexsort((key, rows))
    rows, items = rows[order], items[order]
    take = positions_in_rows(rows) < quota[rows]
    return Proposals(rows[take], items[take])


@functools.lru_cache(maxsize=64)
def _names_by_bits(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """For every bit mask over ``names``, the names whose bits are set."""
    return [tuple(name for j, name in enumerate(names) if bits >> j & 1) for bits in range(1 << len(names))]


@dataclass
class Candidates:
    """The merged candidates of a batch: flat ``rows`` and ``items`` grouped by row (in
    order of first proposal), and for each a bit mask of the sources (bit ``j`` =
    ``names[j]``) that proposed it."""

    rows: np.ndarray  # [n] int64
    items: np.ndarray  # [n] int64
    source_bits: np.ndarray  # [n] uint32
    names: tuple[str, ...]

    def sources_at(self, positions) -> list[tuple[str, ...]]:
        """The names of the sources that proposed the candidates at ``positions``."""
        by_bits = _names_by_bits(self.names)
        return [by_bits[bits] for bits in self.source_bits[positions].tolist()]

    @property
    def sources(self) -> list[list[str]]:
        return [list(s) for s in self.sources_at(np.arange(len(self.items)))]


def merge(proposals: list[tuple[str, Proposals]], n_candidates: int) -> Candidates:
    """De-duplicate each user's proposals in order (source by source, each best first),
    recording every source that proposed each item, and keep each user's first
    ``n_candidates`` items."""
    names = tuple(name for name, _ in proposals)
    rows = np.concatenate([p.rows for _, p in proposals] or [np.zeros(0, np.int64)])
    items = np.concatenate([p.items for _, p in proposals] or [np.zeros(0, np.int64)])
    bit = np.repeat(
        np.left_shift(np.uint32(1), np.arange(len(proposals), dtype=np.uint32)), [len(p.rows) for _, p in proposals]
    )
    if len(items) == 0:
        return Candidates(rows, items, np.zeros(0, np.uint32), names)
    # Within a row, concatenation order is proposal order (source, then rank): a stable
    # sort by (row, item) puts each (row, item)'s first proposal first among its copies.
    # One row (a lone request): the item alone is the key. The rows are concatenated
    # source by source, so they are not sorted: every row must be checked, not the ends.
    single = rows.min() == rows.max()
    key = items if single else rows * (int(items.max()) + 1) + items
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    is_first = np.empty(len(order), bool)
    is_first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_first[1:])
    starts = np.flatnonzero(is_first)
    first = order[starts]  # each distinct (row, item)'s first proposal
    bits = np.bitwise_or.reduceat(bit[order], starts)
    if single:
        keep = np.argsort(first)[:n_candidates]
        return Candidates(rows[: len(keep)], items[first[keep]], bits[keep], names)
    keep = np.argsort(rows[first] * len(rows) + first)  # by row, then first proposal
    keep = keep[positions_in_rows(rows[first][keep]) < n_candidates]
    return Candidates(rows[first][keep], items[first][keep], bits[keep], names)


def quotas(weights: dict[str, float], available: list[str], n_candidates: int) -> dict[str, int]:
    """Split ``n_candidates`` among the available sources in proportion to their
    weights (each available source gets at least one slot)."""
    total = sum(weights.get(name, 0.0) for name in available)
    if total <= 0:
        return {name: n_candidates // max(len(available), 1) for name in available}
    return {name: max(1, int(round(n_candidates * weights.get(name, 0.0) / total))) for name in available}
