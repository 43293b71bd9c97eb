"""The one return convention of every ranking call of the library.

``Engine.recommend`` / ``recommend_batch`` / ``score`` / ``similar_items``, the gRPC
client's methods, ``CFModel.recommend`` / ``similar_items`` and
``LoadedBundle.similar_items`` all return :class:`Recommendations`, best first. (The
``*_indices`` methods of the models are the evaluation interface: ``[n_users, k]``
matrices of item *indices* for :mod:`engine.evaluation.metrics`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCORE = "score"  # higher is better
SQUARED_DISTANCE = "squared_distance"  # lower is better ("more like this")


@dataclass
class Recommendations:
    """Ranked items, best first: ``item_ids [k]`` (external ids) and ``scores [k]``, what
    the scores are (``metric``: ``"score"``, higher is better, or ``"squared_distance"``,
    lower is better, for "more like this"; :attr:`distances` names them so), for each
    item the names of the sources that proposed it, and its display title (the id where
    there is none). ``candidates`` counts, for ``recommend``, how many candidates each
    source proposed (for monitoring); it is empty for the other methods."""

    item_ids: np.ndarray
    scores: np.ndarray
    sources: list[tuple[str, ...]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)
    metric: str = SCORE
    # For recommend: how the user was known ("known user", "fold-in", "features",
    # "popularity"), so that an unknown id served by popularity is never silent.
    served_by: str = ""
    # With explain=True: per item, the features that contributed most to its score,
    # largest first, as {"feature", "value", "contribution"} (Engine.recommend).
    explanations: list[list[dict]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __iter__(self):
        return iter(zip(self.item_ids.tolist(), self.scores.tolist(), self.sources))

    @property
    def distances(self) -> np.ndarray:
        """The scores of a "more like this" result, by their name: squared distances."""
        if self.metric != SQUARED_DISTANCE:
            raise AttributeError(f"these are {self.metric}s, not distances")
        return self.scores

    def to_list(self) -> list[dict]:
        return [
            {"item_id": i, "score": s, "sources": list(src), "title": t}
            for (i, s, src), t in zip(self, self.titles or [""] * len(self))
        ]
