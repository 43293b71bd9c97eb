"""The served catalogue: everything a request reads about items, as one immutable version.

Items added live (:meth:`engine.Engine.add_items`) grow several per-item tables at once:
the id map, titles, item attributes, the item vectors of the models that embed new items
(the towers), popularity, and those models' indexes. A
request that read some of them before an addition and some after would meet item
indices that one table covers and another does not (wrong answers, ``IndexError``, or a
crash in compiled code). So none of them is ever changed in place: an addition builds
a new :class:`Catalogue` — copies of the small tables, a copy of each such index with
the new vectors — and the engine swaps one reference. A request takes that reference
once, at its start, and reads one consistent version to its end; readers take no lock.

An addition therefore costs a copy of the towers index (tens of milliseconds at 100k
items): add items in batches rather than one call per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.data import IdMap
from engine.data.attributes import ItemAttributes


def read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Catalogue:
    """One version of the served items. Never modified: :meth:`with_items` returns a new one."""

    items: IdMap
    titles: np.ndarray | None  # [n_items] display titles, or None
    attributes: ItemAttributes  # what filters read: genres, tags, category, price, ...
    # Model name -> [n, d] float32 its retrieval item vectors (what the ranking scores
    # against). Items added live get a row from every model (CF's borrowed: live_items).
    item_vectors: Mapping[str, np.ndarray]
    popularity: np.ndarray  # [n_items] float32 interaction counts (0 for items added live)
    popularity_score: np.ndarray  # [n_items] float32 standardised log-popularity
    sources: dict  # name -> Source; a model's source holds this version of its index
    every_item: np.ndarray  # [n_items] all True, read-only: the mask of an unfiltered request
    # Items added live borrow the evidence they lack from their nearest bundle items by
    # content (engine.serving.live_items): row j of each array is item n_bundle + j's
    # neighbours [K] and their weights [K] (summing to 1).
    borrowed_from: np.ndarray = field(default_factory=lambda: read_only(np.zeros((0, 1), np.int64)))
    borrowed_weights: np.ndarray = field(default_factory=lambda: read_only(np.zeros((0, 1), np.float32)))

    @property
    def n_bundle(self) -> int:
        """Items of the bundle (labels below it); items added live come after."""
        return self.n_items - len(self.borrowed_from)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def with_items(
        self,
        item_ids: list[str],
        vectors: Mapping[str, np.ndarray],
        attributes: Sequence[Mapping],
        titles: list[str],
        borrowed: tuple[np.ndarray, np.ndarray],
    ) -> Catalogue:
        """A new version with these items appended (ids already checked to be new), with
        ``vectors`` from each model that embeds them and their ``attributes`` (a dict
        per item, checked by :meth:`ItemAttributes.appended`). Each such model's source searches a
        copy of its index holding the new vectors, and no longer reads the per-user
        table: that table ranks the bundle's items only. ``borrowed``: each new item's
        nearest bundle items and weights ``([n, K], [n, K])``, whose popularity score it
        takes (their weighted mean)."""
        n_new = len(item_ids)
        near, weights = borrowed
        sources = dict(self.sources)
        for name, new in vectors.items():
            old = self.sources[name]
            sources[name] = type(old)(name, old.index.added(new), None)
        concat = lambda old, new: read_only(np.concatenate([old, new]))  # noqa: E731
        popularity = concat(self.popularity, np.zeros(n_new, np.float32))
        # The popularity source ranks the new items too (last: no interactions yet), so
        # that a filter only they match still finds them for a user known to no model.
        sources["popular"] = type(self.sources["popular"])(popularity)
        return replace(
            self,
            items=self.items.extended(item_ids),
            # Titles as Python strings (object array): a long title costs its own length,
            # not that length for every item, as a fixed-width unicode array would.
            titles=None if self.titles is None else read_only(np.array(self.titles.tolist() + titles, object)),
            attributes=self.attributes.appended(attributes),
            item_vectors={
                **self.item_vectors,
                **{name: concat(self.item_vectors[name], new.astype(np.float32)) for name, new in vectors.items()},
            },
            popularity=popularity,
            # The popularity score the new items' neighbours have, weighted: what their
            # content predicts, where a count of 0 would rank any new item last.
            popularity_score=concat(
                self.popularity_score, (weights * self.popularity_score[near]).sum(axis=1).astype(np.float32)
            ),
            sources=sources,
            every_item=read_only(np.ones(self.n_items + n_new, bool)),
            # (The first addition sets K, the neighbours per item; later ones keep it.)
            borrowed_from=concat(self.borrowed_from.reshape(-1, near.shape[1]), near.astype(np.int64)),
            borrowed_weights=concat(self.borrowed_weights.reshape(-1, near.shape[1]), weights.astype(np.float32)),
        )
