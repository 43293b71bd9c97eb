"""Items added to a running engine: validated and embedded before anything changes
(all or nothing), journaled at the bundle root before they are acknowledged, and served
by swapping the engine's catalogue (:mod:`engine.serving.catalogue`); and the journal's
lines that other processes of the root added."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import InvalidRequest, shorten

if TYPE_CHECKING:
    from engine.serving.engine import Engine

log = logging.getLogger("tandem.engine")

BORROWED_FROM = 10  # bundle items a new item borrows its evidence from (nearest by content)
# Added to a cosine distance before inverting it: float32 rounding of unit vectors' cosine
# (about 1e-7), so that items of the same content weigh alike and finitely.
CONTENT_EPSILON = 1e-6


class LiveItems:
    """The write side of one engine's catalogue. Writers go one at a time (a lock);
    readers take none: they read one catalogue reference."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the root's added-items journal already served

    def add(self, item_ids: Sequence[object], item_features: Sequence[Mapping], persist: bool = True) -> int:
        """Add new items, embedded by the item tower from their features (plus an optional
        ``"title"``); they are served from the next request on. With ``persist`` (and an
        engine loaded from a bundle root) they are first appended to the root's
        ``added_items.jsonl``: replayed by every later load, picked up by the other server
        processes of the root (:meth:`sync`), and copied into the next bundle
        by ``make index``. All or nothing: a rejected request changes nothing. Returns
        the catalogue size after the addition."""
        new_ids, features, titles, vectors = self._checked(item_ids, item_features)
        from engine.index import bundle

        with self._lock:
            cat = self._engine._catalogue
            existing = [i for i in new_ids if i in cat.items]
            if existing:
                raise InvalidRequest(f"item id(s) already in the catalogue: {shorten(existing[:5])}")
            root = bundle.root_of(self._engine.bundle.path)
            if persist and root is not None:  # durable before it is served or acknowledged
                bundle.append_added_items(
                    root / bundle.ADDED_ITEMS,
                    [
                        {"item_id": i, "title": t, "features": f, "dataset": self.dataset}
                        for i, t, f in zip(new_ids, titles, features)
                    ],
                )
            self._append(new_ids, titles, vectors, features)
            return self._engine._catalogue.n_items

    def _checked(self, item_ids: Sequence[object], item_features: Sequence[Mapping]):
        """Items to add, validated and embedded before anything changes: ``(ids, features
        as JSON-ready dicts without the title, titles, tower vectors)``."""
        if len(item_ids) != len(item_features) or not item_ids:
            raise InvalidRequest("add_items needs one feature dict per item id, and at least one item")
        new_ids = [str(i) for i in item_ids]
        if any(not i for i in new_ids):
            raise InvalidRequest("item ids must not be empty")
        config = self._engine.config
        config.check_texts(new_ids, "item id", ids=True)
        if len(set(new_ids)) != len(new_ids):
            raise InvalidRequest(f"item ids repeated in the request: {shorten(new_ids[:5])}")
        features, titles = [], []
        for f in item_features:
            if not isinstance(f, Mapping):
                raise InvalidRequest(f"item features must be a mapping, got {shorten(f)}")
            config.check_texts([f.get("title")], "item title")
            config.check_texts([v for name, v in f.items() if name != "title"], "item feature value")
            titles.append(str(f.get("title", "") or ""))
            # "title" is display metadata, not a model feature.
            features.append(
                {
                    name: (np.asarray(v).tolist() if isinstance(v, (list, tuple, np.ndarray)) else v)
                    for name, v in f.items()
                    if name != "title"
                }
            )
        vectors = self._engine.towers.item_embeddings([dict(f) for f in features])  # checks names and values
        if not np.isfinite(vectors).all():
            raise InvalidRequest("item features out of range: the item tower gives a non-finite vector")
        # The new items' attributes (filters), checked before anything changes. (Not kept:
        # another add may swap the catalogue before this one takes the lock; _append
        # appends to the catalogue it then holds.)
        self._engine._catalogue.attributes.appended(features)
        self._labels_by_name(features)
        return new_ids, features, titles, vectors

    @property
    def dataset(self) -> str:
        """The name of the dataset this engine's bundle was built from: an added item
        belongs to it (its journal record says so), not to whatever the root serves next."""
        return self._engine.bundle.manifest.dataset.name

    def _labels_by_name(self, features: list[dict]) -> None:
        """Multi-valued features given as 0/1 flags are kept as label names, so that a
        bundle whose label list differs reads them by name, never by position."""
        encoders = {e.name: e for e in self._engine.towers.item_pipeline.encoders}
        for f in features:
            for name, value in f.items():
                encoder = encoders.get(name)
                if encoder is None or encoder.kind != "multihot" or len(encoder.vocab) != encoder.width:
                    continue
                if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
                    f[name] = [label for label, flag in zip(encoder.vocab, value) if flag]

    def sync(self) -> int:
        """Serve the items other processes (or an earlier run) appended to the bundle
        root's journal since this engine last read it. Records that cannot be served (a
        duplicate id, features this bundle's item tower does not know) are logged and
        skipped, never fatal. Returns how many items were added."""
        from engine.index import bundle

        root = bundle.root_of(self._engine.bundle.path)
        if root is None:
            return 0
        with self._lock:
            records, self._offset = bundle.read_added_items(root / bundle.ADDED_ITEMS, self._offset)
            return self.serve(records)

    def serve(self, records: list[dict]) -> int:
        """Add journal records not yet served, one batch where it can, one by one where a
        record is refused (so that one bad record does not hide the rest). Records added
        to another dataset's bundle are skipped (logged once per call)."""
        other = [r for r in records if r.get("dataset") not in (None, self.dataset)]
        if other:
            log.warning(
                "%d added item(s) skipped: added to dataset(s) %s, this bundle serves %s",
                len(other),
                shorten(sorted({r["dataset"] for r in other})),
                shorten(self.dataset),
            )
        records = [r for r in records if r.get("dataset") in (None, self.dataset)]
        fresh = {r["item_id"]: r for r in records if r["item_id"] not in self._engine._catalogue.items}
        if not fresh:
            return 0
        batch = list(fresh.values())
        ids = [r["item_id"] for r in batch]
        features = [{**r["features"], **({"title": r["title"]} if r["title"] else {})} for r in batch]
        try:
            checked = [self._checked(ids, features)]
        except InvalidRequest:
            checked = []
            for i, f in zip(ids, features):
                try:
                    checked.append(self._checked([i], [f]))
                except InvalidRequest as e:
                    log.warning("added item %s skipped: %s", shorten(i), e)
        for new_ids, features, titles, vectors in checked:
            self._append(new_ids, titles, vectors, features)
        return sum(len(c[0]) for c in checked)

    def _append(self, new_ids: list[str], titles: list[str], vectors: np.ndarray, features: list[dict]) -> None:
        """Swap in the catalogue with these (checked, new) items: one reference assignment."""
        engine = self._engine
        cat = engine._catalogue
        near, weights = self.content_neighbours(vectors)
        # CF has no vector for an item without interactions: it takes its neighbours'
        # (weighted), so CF scores and retrieves it as it does the items of that content.
        cf_vectors = cat.item_vectors[engine.cf.name]
        borrowed_cf = np.einsum("nk,nkf->nf", weights, cf_vectors[near])
        engine._catalogue = cat.with_items(
            new_ids,
            {engine.towers.name: vectors, engine.cf.name: borrowed_cf},
            features,
            [t or i for i, t in zip(new_ids, titles)],
            (near, weights),
        )

    def content_neighbours(self, tower_vectors: np.ndarray, k: int = BORROWED_FROM) -> tuple[np.ndarray, np.ndarray]:
        """Each new item's ``k`` nearest bundle items by item-tower cosine and their
        weights ``([n, k], [n, k])``, inversely proportional to the cosine distance
        (Shepard's inverse distance weighting, ``1 / (1 - cosine + CONTENT_EPSILON)``).
        Like is compared with like: a new item's vector (its content; no rating history)
        with each bundle item's vector from its content alone
        (``TwoTowerModel.content_item_vectors``). So an item whose content is a bundle
        item's (cosine 1) borrows that item's evidence, or the mean of all the items
        sharing that content; an item like none borrows from its nearest ones in
        proportion to their closeness, whatever the scale of the cosines.

        A new item has no interactions; the evidence it has is its content. The towers
        score it by its own vector; its CF vector, popularity score and the learned
        ranker's item-side features are those of these neighbours, weighted — so a new
        item is ranked like the items it resembles instead of last for the interactions
        it cannot have yet."""
        engine = self._engine
        known = engine.towers.content_item_vectors()[: len(engine.cf.items)]
        k = min(k, len(known))
        near = np.empty((len(tower_vectors), k), np.int64)
        weights = np.empty((len(tower_vectors), k), np.float32)
        for start in range(0, len(tower_vectors), 64):  # bounded memory: 64 x n_items similarities
            sims = tower_vectors[start : start + 64] @ known.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            distance = np.maximum(1.0 - np.take_along_axis(sims, top, 1).astype(np.float64), 0.0)
            w = 1.0 / (distance + CONTENT_EPSILON)
            near[start : start + 64], weights[start : start + 64] = top, w / w.sum(axis=1, keepdims=True)
        return near, weights
