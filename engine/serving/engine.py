"""The Engine: a published bundle served in two stages.

1. **Retrieval** — candidate sources (:mod:`engine.serving.retrieval`) each propose items for the
   request: ANN over CF vectors (``cf``), ANN over tower vectors (``towers``), global
   popularity (``popular``), popularity in the user's segment (``segment``), and
   squared-distance neighbours of the user's recent likes (``recent``). Their union,
   de-duplicated under per-source quotas, is at most ``n_candidates`` items. Known
   users' searches are done once, when the bundle is built: ``cf`` and ``towers`` read
   a user's top unseen items from a table, ``recent`` its likes' nearest items, and
   only requests those tables cannot answer search at request time.
2. **Ranking** — every candidate is scored exactly by the blend of the models
   (:mod:`engine.serving.ranking`); when the bundle holds a learned ranker
   (:mod:`engine.models.ranker`, ``engine.ranking = "auto"``), it re-scores each user's
   best ``depth`` candidates by the blend from their features
   (:mod:`engine.serving.features`). The top ``k`` come back with the sources that
   proposed them and, on request, the features that contributed most to each score.

Every method returns :class:`Recommendations` — ``item_ids``, ``scores`` and
``sources``, best first — so library, CLI and gRPC speak one convention.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequest, UnknownIdError, shorten
from engine.index.bundle import LoadedBundle
from engine.index.exact import ExactIndex
from engine.index.vector_index import Conditions
from engine.models.cf import CFModel
from engine.models.ranker import Ranker
from engine.models.towers import TwoTowerModel
from engine.results import SCORE, SQUARED_DISTANCE, Recommendations
from engine.serving.catalogue import Catalogue, read_only
from engine.serving.features import SOURCES, ItemHistoryTables, RankingFeatures, affinity_attributes
from engine.serving.feedback import LiveFeedback, Recorded
from engine.serving.live_items import LiveItems
from engine.serving.pipeline import make_pipeline
from engine.serving.ranking import Blend, ScoreScale
from engine.serving.retrieval import (
    Candidates,
    ModelSource,
    PopularitySource,
    RecentNeighboursSource,
    Requests,
    SegmentSource,
    quotas,
)
from engine.serving.users import UserContext
from engine.settings import EngineConfig
from engine.topk import top_k_desc, top_k_per_row

SOURCE_NAMES = SOURCES  # the retrieval sources, in merge order
EXPLAINED_FEATURES = 3  # features per recommendation in an explanation
DEFAULT_CANDIDATES = 500  # n_candidates of recommend and recommend_batch
BATCH_CHUNK = 256  # users served by one pass of the batch pipeline


class Engine:
    """Recommendations from a published bundle. Build with :meth:`Engine.load`."""

    def __init__(self, published: LoadedBundle, cf: CFModel, towers: TwoTowerModel, config: EngineConfig):
        self.bundle, self.cf, self.towers, self.config = published, cf, towers, config
        # Items added live swap the catalogue (engine.serving.live_items); readers take no
        # lock: they read one Catalogue reference (see engine.serving.catalogue).
        self.live_items = LiveItems(self)
        layout = published.layout
        load = layout.load_table
        # The user side of every request (engine.serving.users).
        self.user_context = UserContext(published, cf, towers, config)
        popularity = load("popularity").astype(np.float32)
        # Bundles built before the neighbour table existed search cf_l2 live instead.
        neighbours = load("item_neighbours", optional=True)
        titles = load("item_titles", optional=True)
        # Each known user's top unseen items in cf_ip / towers_ip, searched when the bundle
        # was built (bundles built before these tables existed search at every request).
        # Mapped read-only, not copied: the server processes of one machine share them.
        # (np.asarray: a plain array over the mapping; np.memmap's slices cost more.)
        models = self.user_context.models  # name -> EmbeddingModel, in ranking order
        sources: dict = {}
        for name in models:
            index = f"{name}_ip"  # each model's inner-product index (index_builder.build)
            top = layout.load_table(f"user_top_{index}", mmap=True) if layout.has_table(f"user_top_{index}") else None
            sources[name] = ModelSource(name, published.index(index), None if top is None else np.asarray(top))
        sources.update(
            {
                "popular": PopularitySource(popularity),
                "recent": RecentNeighboursSource(published.index("cf_l2"), cf.X, neighbours),
            }
        )
        if config.segment_key in published.manifest.segments:
            sources["segment"] = SegmentSource(config.segment_key, layout.load_segment(config.segment_key, "top_items"))
        self.weights = {towers.name: config.blend_towers, cf.name: config.blend_cf}
        self._splits: dict = {}  # quota splits by available sources (see _quotas)
        self._names: dict = {}  # checked source lists (see _source_names)
        n_items = len(published.items)
        self._catalogue = Catalogue(
            published.items,
            titles,
            layout.load_attributes(published.manifest),
            {name: read_only(model.retrieval_item_vectors()) for name, model in models.items()},
            read_only(popularity),
            read_only(self._popularity_score(popularity)),
            sources,
            read_only(np.ones(n_items, bool)),
        )
        self._pipeline = make_pipeline(config.pipeline, sources, n_items)  # engine.serving.pipeline
        top_k_desc(np.zeros(2, np.float32), 1)  # compiles (or loads) the small-k top-k now, not in a request
        self._fit_scales()
        self.features = self._ranking_features(published, popularity)
        # The learned ranker, where the bundle has one and the configuration serves it.
        self.ranker: Ranker | None = None
        if config.ranking == "auto" and layout.model("ranker").is_dir():
            self.use_ranker(Ranker.load(layout.model("ranker")))
        # Events recorded live (engine.serving.feedback): the user side reads them.
        self.feedback = LiveFeedback(self)
        self.user_context.feedback = self.feedback

    def use_ranker(self, ranker: Ranker | None) -> None:
        """Serve with ``ranker`` (None: the blend alone). Its features must be the ones
        this bundle computes (with its rating model's prediction, where it has one): a
        ranker trained on another bundle's features is refused."""
        features = self.features.with_rating(None if ranker is None else ranker.rating)
        if ranker is not None and ranker.feature_names != features.names:
            raise ValueError(
                f"the ranker expects features {ranker.feature_names}, this bundle computes {features.names}"
            )
        self.features, self.ranker = features, ranker

    def use_rating_model(self, rating: CFModel | None) -> None:
        """Compute the ``rating_prediction`` feature with ``rating`` (None: not at all),
        without a ranker: what a ranker's training examples are made with
        (``index_builder.ranker``). Serving with the blend alone."""
        self.features, self.ranker = self.features.with_rating(rating), None

    def _ranking_features(self, published: LoadedBundle, popularity: np.ndarray) -> RankingFeatures:
        layout, n_items = published.layout, len(popularity)

        def table(name: str, instead: np.ndarray) -> np.ndarray:
            """A table of the ranker's features; ``instead`` for bundles built before it."""
            found = layout.load_table(name, optional=True)
            return instead if found is None else found

        no_rates, zeros = np.zeros(0, np.float32), np.zeros(n_items, np.float32)  # rates unknown; new, not recent
        no_pairs = (np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))  # no item-item table
        key = self.config.segment_key if self.config.segment_key in published.manifest.segments else None
        return RankingFeatures(
            tuple(self.user_context.models),
            self.blend.scales,
            ItemHistoryTables(
                table("item_like_rate", no_rates),
                table("item_mean_rating", no_rates),
                table("item_trend", zeros),
                table("item_age", zeros),
                table("item_cooccurring", no_pairs[0]),
                table("item_cooccurrence", no_pairs[1]),
                table("item_ease_from", no_pairs[0]),
                table("item_ease_weight", no_pairs[1]),
            ),
            self.cf.X,
            key,
            None if key is None else layout.load_segment(key, "top_items"),
            None if key is None else layout.load_segment(key, "top_counts"),
            affinity_attributes(self._catalogue.attributes),
        )

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig | None = None, verify: bool = True) -> Engine:
        """Open a bundle (or a bundle root holding ``current``), verifying its checksums."""
        published = LoadedBundle(path, verify=verify)
        engine = cls(
            published,
            CFModel.load(published.layout.model("cf")),
            TwoTowerModel.load(published.layout.model("towers")),
            config or EngineConfig(),
        )
        from engine.index import bundle

        engine.live_items.serve(bundle.read_added_items(published.layout.added_items)[0])
        engine.sync_added_items()
        engine.feedback.sync(on_load=True)  # the events recorded after this bundle's data was read
        return engine

    # ------------------------------------------------- the catalogue now
    # Each reads the current Catalogue; a request reads it once (self._catalogue) instead.
    @property
    def items(self):
        return self._catalogue.items

    @property
    def sources(self) -> dict:
        return self._catalogue.sources

    @property
    def titles(self) -> np.ndarray | None:
        return self._catalogue.titles

    @property
    def attributes(self):
        """The items' attributes that filters read (:class:`~engine.data.attributes.ItemAttributes`)."""
        return self._catalogue.attributes

    @property
    def genres(self) -> np.ndarray | None:
        """The ``genres`` attribute's ``[n_items, n_genres]`` flags, where the data has one."""
        attributes = self._catalogue.attributes
        return attributes["genres"].values if "genres" in attributes else None

    @property
    def genre_labels(self) -> list[str]:
        attributes = self._catalogue.attributes
        return list(attributes["genres"].vocabulary) if "genres" in attributes else []

    @property
    def tower_item_vectors(self) -> np.ndarray:
        return self._catalogue.item_vectors[self.towers.name]

    @property
    def popularity(self) -> np.ndarray:
        return self._catalogue.popularity

    @property
    def popularity_score(self) -> np.ndarray:
        return self._catalogue.popularity_score

    # The bundle's users (engine.serving.users.UserContext holds them).
    @property
    def users(self):
        return self.user_context.users

    @property
    def seen_indptr(self) -> np.ndarray:
        return self.user_context.seen_indptr

    @property
    def seen_indices(self) -> np.ndarray:
        return self.user_context.seen_indices

    @property
    def user_tower_vectors(self) -> np.ndarray:
        return self.user_context.user_tower_vectors

    @property
    def version(self) -> str:
        return self.bundle.version

    def _fit_scales(self) -> None:
        """Bundle-wide score statistics of every model, from a seeded sample of its
        users x items; they make the ranking's blend (:mod:`engine.serving.ranking`)."""
        rng = np.random.default_rng(0)
        scales = {}
        ctx, item_vectors = self.user_context, self._catalogue.item_vectors
        for name, queries in ctx.user_queries.items():
            n_users, n_items = len(queries), len(item_vectors[name])
            users = np.sort(rng.choice(n_users, min(200, n_users), replace=False))
            items = rng.choice(n_items, min(2000, n_items), replace=False)
            sample = queries[users] @ item_vectors[name][items].T + ctx.user_biases[name][users, None]
            scales[name] = ScoreScale.fit(sample)
        self.blend = Blend(self.weights, scales, self.config.blend_popularity)

    @staticmethod
    def _popularity_score(popularity: np.ndarray) -> np.ndarray:
        """Standardised log-popularity: the score of a user with neither CF nor tower vector."""
        log_pop = np.log1p(popularity)
        return ScoreScale.fit(log_pop)(log_pop).astype(np.float32)

    # ------------------------------------------------------------- users
    def _item_mask(self, cat: Catalogue, exclude_items, include_items, filters) -> tuple[np.ndarray, Conditions | None]:
        """Items a request may return before per-user exclusions: block-list, allow-list
        and attribute filters applied (read-only: shared by every unfiltered request);
        and the attribute filters with their own mask, for vector backends that search
        with them natively."""
        if not exclude_items and include_items is None and not filters:
            return cat.every_item, None
        allowed = np.ones(cat.n_items, bool)
        conditions = None
        if exclude_items:
            allowed[cat.items.indices(exclude_items)] = False
        if include_items is not None:
            only = np.zeros(cat.n_items, bool)
            only[cat.items.indices(include_items)] = True
            allowed &= only
        if filters:  # attribute filters (engine.data.attributes): genres, tags, category, price, ...
            conditions = Conditions(dict(filters), cat.attributes.mask(filters, cat.n_items))
            allowed &= conditions.mask
        return allowed, conditions

    # -------------------------------------------------------- scoring
    def _blend(self, cat: Catalogue, requests: Requests, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Exact scores of (user ``rows[j]``, item ``items[j]``) pairs: the blend of the
        models (:class:`~engine.serving.ranking.Blend`)."""
        return self.blend.scores(requests, rows, items, cat.item_vectors, cat.popularity_score)

    def _rank(
        self, cat: Catalogue, requests: Requests, candidates: Candidates, k: int, ranker: Ranker | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The ranking stage: ``(at, scores, features)``, the positions of the candidates
        scored last (rows ascending), their scores, and their features (None when the
        blend alone ranks). With a ranker, the blend scores every candidate and the
        ranker re-scores each user's best ``max(depth, k)`` of them (phased ranking)."""
        if ranker is None:
            blend = self._blend(cat, requests, candidates.rows, candidates.items)
            return np.arange(len(blend)), blend, None
        at, features = self._first_phase(cat, requests, candidates, max(ranker.depth, k))
        return at, ranker.predict(features), features

    def _first_phase(
        self, cat: Catalogue, requests: Requests, candidates: Candidates, depth: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's best ``depth`` candidates by the blend (positions, rows
        ascending) and their features: what the ranker scores."""
        standardised: dict[str, np.ndarray] = {}  # each model's z, from the blend's own terms
        blend = self.blend.scores(
            requests, candidates.rows, candidates.items, cat.item_vectors, cat.popularity_score, standardised
        )
        at = top_k_per_row(candidates.rows, blend, depth, len(requests))
        chosen = {name: z[at] for name, z in standardised.items()}
        return at, self.features.of_candidates(requests, candidates, at, blend[at], cat, chosen)

    def ranking_examples(
        self, user_ids: Sequence[object], depth: int, n_candidates: int = DEFAULT_CANDIDATES
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a ranker is trained on (``index_builder.ranker``): ``(rows, items,
        features)`` of each user's best ``depth`` candidates by the blend, retrieved as
        ``recommend`` retrieves them (seen items excluded); ``rows`` index ``user_ids``
        (ascending), ``items`` are item indices."""
        self._check_k(1, n_candidates)
        cat, users = self._catalogue, list(user_ids)
        parts = []
        for start in range(0, len(users), BATCH_CHUNK):
            requests = self.user_context.requests(cat, users[start : start + BATCH_CHUNK], True, cat.every_item)
            candidates, _ = self._candidates(cat, requests, n_candidates, None)
            at, features = self._first_phase(cat, requests, candidates, depth)
            parts.append((candidates.rows[at] + start, candidates.items[at], features))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(self.features.names)), np.float32)
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]

    def _explanations(
        self,
        cat: Catalogue,
        requests: Requests,
        rows: np.ndarray,
        items: np.ndarray,
        features: np.ndarray,
        ranker: Ranker | None,
    ) -> list[list[dict]]:
        """Per pair, the features that contributed most to its score, largest first, as
        ``{"feature", "value", "contribution"}``: the ranker's SHAP values, or the blend's
        terms (each model's weighted standardised score, and popularity's; for an item
        added live that a model lacks, the blend renormalises, which the terms do not)."""
        names = self.features.names
        if ranker is not None:
            contributions = ranker.contributions(features)
        else:  # the blend's terms, each under the feature it reads
            contributions = np.zeros_like(features)
            z = {name: features[:, names.index(f"{name}_score")] for name in self.blend.names}
            for name, term in self.blend.terms(requests, rows, z, cat.popularity_score[items]).items():
                contributions[:, names.index("item_popularity" if name == "popularity" else f"{name}_score")] = term
        top = np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :EXPLAINED_FEATURES]
        return [
            [
                {"feature": names[j], "value": float(features[r, j]), "contribution": float(contributions[r, j])}
                for j in top[r]
                if contributions[r, j] != 0
            ]
            for r in range(len(features))
        ]

    def _check_k(self, k: int, n_candidates: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.config.max_k:
            raise InvalidRequest(f"k must be an integer between 1 and {self.config.max_k}, got {shorten(k)}")
        if n_candidates is not None and (
            isinstance(n_candidates, bool)
            or not isinstance(n_candidates, (int, np.integer))
            or not 1 <= n_candidates <= self.config.max_candidates
        ):
            raise InvalidRequest(
                f"n_candidates must be an integer between 1 and {self.config.max_candidates}, "
                f"got {shorten(n_candidates)}"
            )

    def _result(
        self,
        cat: Catalogue,
        items: np.ndarray,
        scores: np.ndarray,
        sources: list,
        candidates: dict | None = None,
        metric: str = SCORE,
    ) -> Recommendations:
        """The one return convention: item indices to external ids and titles. Scores
        are finite for every request the engine accepts; a request whose values (an
        extreme feature) would still give a non-finite one is refused, not answered."""
        scores = np.asarray(scores, np.float32)
        if not np.isfinite(scores).all():
            raise InvalidRequest("the request's values give non-finite scores (a feature or rating out of range)")
        titles = self._titles(cat, items)
        return Recommendations(cat.items.external(items), scores, sources, titles, candidates or {}, metric)

    @staticmethod
    def _titles(cat: Catalogue, items: np.ndarray) -> list[str]:
        """Display titles of item indices (the external id where there is none)."""
        ids = cat.items.external(items).tolist()
        if cat.titles is None:
            return ids
        return [str(t) or i for t, i in zip(cat.titles[items].tolist(), ids)]

    # ------------------------------------------------------ public API
    def recommend(
        self,
        user_id: object | None = None,
        user_features: Mapping | None = None,
        ratings: Mapping[object, float] | None = None,
        k: int = 10,
        n_candidates: int = DEFAULT_CANDIDATES,
        exclude_seen: bool = True,
        exclude_items: Sequence[object] = (),
        include_items: Sequence[object] | None = None,
        filters: Mapping | None = None,
        sources: Sequence[str] | None = None,
        explain: bool = False,
    ) -> Recommendations:
        """Top ``k`` items for one user.

        Args:
            user_id: an external user id. Unknown ids fall back on ``user_features`` /
                ``ratings`` when given, else on popularity (cold start).
            user_features: raw features of a user (``{"age": 30, "zip_code": "94043"}``):
                the user tower and segment popularity serve a new user from them.
            ratings: ``{item_id: rating}`` given with the request: CF fold-in for it.
            n_candidates: how many candidates retrieval passes to ranking.
            exclude_seen: drop the user's training items (from the bundle) and ``ratings``.
            exclude_items / include_items: block-list / allow-list of external item ids.
            filters: attribute filters (:mod:`engine.data.attributes`), e.g.
                ``{"genres": ["Comedy", "Drama"]}`` (any of), ``{"tags": {"all": [...]}}``,
                ``{"price": {"lt": 100}}``; all must hold.
            sources: restrict retrieval to these sources (default: all available).
            explain: also return, per item, the features that contributed most to its
                score (``Recommendations.explanations``).
        """
        self._check_k(k, n_candidates)
        cat = self._catalogue
        item_mask, conditions = self._item_mask(cat, exclude_items, include_items, filters)
        requests = self.user_context.requests(cat, [user_id], exclude_seen, item_mask, user_features, ratings)
        requests.conditions = conditions
        return self._serve(cat, requests, k, n_candidates, sources, explain)[0]

    def _serve(
        self,
        cat: Catalogue,
        requests: Requests,
        k: int,
        n_candidates: int,
        sources: Sequence[str] | None,
        explain: bool = False,
    ) -> list[Recommendations]:
        """Retrieval, merge and ranking of a batch of prepared requests."""
        candidates, proposed = self._candidates(cat, requests, n_candidates, sources)
        ranker = self.ranker  # one ranker for the whole request, even if another is swapped in
        scored, scores, features = self._rank(cat, requests, candidates, k, ranker)
        top = top_k_per_row(candidates.rows[scored], scores, k, len(requests))
        at = scored[top]
        explanations = None
        if explain:
            if features is None:
                features = self.features.of_candidates(requests, candidates, at, scores[top], cat)
            else:
                features = features[top]
            explanations = self._explanations(
                cat, requests, candidates.rows[at], candidates.items[at], features, ranker
            )
        bounds = np.searchsorted(candidates.rows[at], np.arange(len(requests) + 1))
        results = []
        for u in range(len(requests)):
            part = slice(bounds[u], bounds[u + 1])
            mine = at[part]
            result = self._result(
                cat, candidates.items[mine], scores[top[part]], candidates.sources_at(mine), proposed[u]
            )
            result.served_by = requests.served_by[u]
            if explanations is not None:
                result.explanations = explanations[part]
            results.append(result)
        return results

    def _candidates(
        self, cat: Catalogue, requests: Requests, n_candidates: int, sources: Sequence[str] | None
    ) -> tuple[Candidates, list[dict[str, int]]]:
        """The retrieval stage: merged candidates, and how many each source proposed."""
        shares = self._quotas(cat, requests, n_candidates, sources)
        return self._pipeline.candidates(cat.sources, requests, shares, n_candidates, cat.n_items)

    def _quotas(
        self, cat: Catalogue, requests: Requests, n_candidates: int, sources: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        """Each source's quota ``[U]`` per user: ``n_candidates`` split among the sources
        available to that user (0 where unavailable), in source order."""
        names = self._source_names(tuple(sources) if sources is not None else None)
        n = len(requests)
        # Users differ only in which sources can serve them: one split per pattern (bit j:
        # names[j]), computed once per engine.
        if n == 1:
            pattern = None
            codes = {sum(1 << j for j, name in enumerate(names) if cat.sources[name].available_alone(requests))}
        else:
            pattern = np.zeros(n, np.int64)
            for j, name in enumerate(names):
                pattern[cat.sources[name].available(requests)] |= 1 << j
            codes = set(pattern.tolist())
        for code in codes:
            key = (names, code, n_candidates)
            if key not in self._splits:
                if len(self._splits) >= 4096:  # bounded, whatever mix of options requests send
                    self._splits.clear()
                split = quotas(
                    self.config.source_weights, [s for j, s in enumerate(names) if code >> j & 1], n_candidates
                )
                self._splits[key] = split, {name: np.array([q]) for name, q in split.items()}
        if n == 1:  # a lone request: the cached arrays (read, never written)
            return self._splits[(names, codes.pop(), n_candidates)][1]
        share: dict[str, np.ndarray] = {}
        for code in codes:
            rows = pattern == code if len(codes) > 1 else slice(None)
            for name, q in self._splits[(names, code, n_candidates)][0].items():
                share.setdefault(name, np.zeros(n, np.int64))[rows] = q
        return {name: share[name] for name in names if name in share}  # in source order

    def _source_names(self, sources: tuple[str, ...] | None) -> tuple[str, ...]:
        """The sources a request asks for (default: all), checked, those this bundle has."""
        if sources not in self._names:
            names = sources if sources is not None else SOURCE_NAMES
            unknown = [s for s in names if s not in SOURCE_NAMES]
            if unknown:
                raise InvalidRequest(f"unknown source(s) {shorten(unknown)}; sources: {list(SOURCE_NAMES)}")
            if len(set(names)) != len(names):  # (also keeps this cache small: orders of five names)
                raise InvalidRequest(f"sources named more than once: {shorten(list(names))}")
            self._names[sources] = tuple(s for s in names if s in self.sources)
        return self._names[sources]

    def candidates(
        self,
        user_id: object,
        n_candidates: int = DEFAULT_CANDIDATES,
        sources: Sequence[str] | None = None,
        exclude_seen: bool = True,
    ) -> dict[str, np.ndarray]:
        """Retrieval alone, for evaluation: each available source's proposals (item
        indices, best first) for a user, under the quotas ``recommend`` would use."""
        self._check_k(1, n_candidates)
        cat = self._catalogue
        requests = self.user_context.requests(cat, [user_id], exclude_seen, cat.every_item)
        return {
            name: cat.sources[name].propose(requests, quota).items
            for name, quota in self._quotas(cat, requests, n_candidates, sources).items()
        }

    def recommend_batch(
        self,
        user_ids: Iterable[object],
        k: int = 10,
        n_candidates: int = DEFAULT_CANDIDATES,
        exclude_seen: bool = True,
        exclude_items: Sequence[object] = (),
        include_items: Sequence[object] | None = None,
        filters: Mapping | None = None,
        sources: Sequence[str] | None = None,
        threads: int | None = None,
        deadline: float | None = None,
        explain: bool = False,
    ) -> list[Recommendations]:
        """:meth:`recommend` for many users with the same options, in order.

        The filters are resolved once; users are served in chunks of ``BATCH_CHUNK``
        (256), each chunk by one pass of the batch pipeline (one FAISS call per ANN
        source, NumPy for the rest), chunks by ``threads`` worker threads (default: the
        CPU count, at most 8). With exact indexes each result equals the single call's;
        with HNSW the batch searches the same graph more widely (see
        :mod:`engine.serving.retrieval`). ``deadline`` (a ``time.monotonic()`` time): a chunk
        that would start after it raises :class:`TimeoutError` instead."""
        users = list(user_ids)
        self._check_k(k, n_candidates)
        self.config.check_texts(users, "user id", ids=True)
        cat = self._catalogue  # every chunk reads the same catalogue
        item_mask, conditions = self._item_mask(cat, exclude_items, include_items, filters)

        def serve(start: int) -> list[Recommendations]:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deadline passed after {start} of {len(users)} users")
            requests = self.user_context.requests(cat, users[start : start + BATCH_CHUNK], exclude_seen, item_mask)
            requests.conditions = conditions
            return self._serve(cat, requests, k, n_candidates, sources, explain)

        starts = range(0, len(users), BATCH_CHUNK)
        workers = max(1, min(threads or os.cpu_count() or 1, 8, len(starts)))
        if workers == 1:
            return [rec for start in starts for rec in serve(start)]
        with ThreadPoolExecutor(workers) as pool:
            return [rec for part in pool.map(serve, starts) for rec in part]

    def score(
        self,
        user_id: object | None = None,
        item_ids: Sequence[object] = (),
        user_features: Mapping | None = None,
        ratings: Mapping[object, float] | None = None,
    ) -> Recommendations:
        """Exact ranking scores of caller-given items for one user, best first."""
        if not item_ids:
            raise InvalidRequest("score needs at least one item id")
        cat = self._catalogue
        items = cat.items.indices(item_ids)
        if len(np.unique(items)) != len(items):
            raise InvalidRequest("score: item ids repeated in the request")
        requests = self.user_context.requests(cat, [user_id], False, cat.every_item, user_features, ratings)
        rows = np.zeros(len(items), np.int64)
        standardised: dict[str, np.ndarray] = {}  # each model's z, as the ranking stage reads it
        scores = self.blend.scores(requests, rows, items, cat.item_vectors, cat.popularity_score, standardised)
        ranker = self.ranker
        if ranker is not None:
            # The ranker reads which sources propose each item, and where: those of the
            # request recommend would make for this user (default options; an item no
            # source proposes comes after the last candidate), so both score alike.
            shown = self.user_context.requests(cat, [user_id], True, cat.every_item, user_features, ratings)
            candidates, _ = self._candidates(cat, shown, DEFAULT_CANDIDATES, None)
            found = {item: j for j, item in enumerate(candidates.items.tolist())}
            at = np.array([found.get(i, -1) for i in items.tolist()], np.int64)
            bits = np.where(at >= 0, candidates.source_bits[np.maximum(at, 0)], 0).astype(np.uint32)
            positions = np.where(at >= 0, at, len(candidates.items))
            features = self.features.compute(
                requests, rows, items, bits, candidates.names, positions, scores, cat, standardised
            )
            scores = ranker.predict(features)
        order = np.argsort(-scores, kind="stable")
        return self._result(cat, items[order], scores[order], [("request",)] * len(order))

    def similar_items(self, item_id: object, k: int = 10) -> Recommendations:
        """Items nearest ``item_id`` by squared distance, ascending, the item excluded:
        CF item vectors through the ``cf_l2`` index, or tower vectors (``|a - b|^2 =
        2 - 2 a.b`` for unit vectors) for items added live without a CF vector."""
        self._check_k(k)
        cat = self._catalogue
        i = cat.items.index(item_id)
        if i < len(self.cf.items):  # items added live have no CF vector
            found = self.bundle.similar_items(item_id, k, item_vectors=self.cf.X)
            items = cat.items.indices(found.item_ids)
            return self._result(cat, items, found.distances, [("cf_l2",)] * len(items), metric=SQUARED_DISTANCE)
        vectors = cat.item_vectors[self.towers.name]
        sims, top = ExactIndex(vectors, "ip").search(vectors[i : i + 1], k + 1)
        keep = (top[0] >= 0) & (top[0] != i)
        sims, top = sims[0][keep][:k], top[0][keep][:k]
        distances = (2 - 2 * sims).astype(np.float32)
        return self._result(cat, top, distances, [("towers",)] * len(top), metric=SQUARED_DISTANCE)

    def add_items(self, item_ids: Sequence[object], item_features: Sequence[Mapping], persist: bool = True) -> int:
        """Add new items, embedded by the item tower from their features (plus an optional
        ``"title"``); they are served from the next request on. With ``persist`` (and an
        engine loaded from a bundle root) they are first appended to the root's
        ``added_items.jsonl``: replayed by every later load, picked up by the other server
        processes of the root (:meth:`sync_added_items`), and copied into the next bundle
        by ``make index``. All or nothing: a rejected request changes nothing. Returns
        the catalogue size after the addition (:mod:`engine.serving.live_items`)."""
        return self.live_items.add(item_ids, item_features, persist)

    def sync_added_items(self) -> int:
        """Serve the items other processes (or an earlier run) appended to the bundle
        root's journal since this engine last read it; returns how many."""
        return self.live_items.sync()

    def record(self, events: Sequence[Mapping], persist: bool = True) -> Recorded:
        """Record what users did: a batch of events ``{"user_id", "item_id", "kind",
        "value", "timestamp"}`` (:mod:`engine.data.feedback`; ``value`` and ``timestamp``
        optional). Validated whole: a bad event raises
        :class:`~engine.errors.InvalidRequest`, an item the catalogue does not hold
        :class:`~engine.errors.UnknownIdError`, and nothing is recorded. With ``persist``
        (and an engine loaded from a bundle root) the batch is appended to the root's
        ``feedback.jsonl`` before this returns (fsynced by default), replayed by every
        later load and read by the other server processes of the root
        (:meth:`sync_feedback`). The next request of each user is served from their
        whole history, events included; a user id the bundle does not know becomes a new
        user (:mod:`engine.serving.feedback`)."""
        return self.feedback.record(events, persist)

    def sync_feedback(self) -> int:
        """Apply the events other processes (or an earlier run) appended to the bundle
        root's feedback log since this engine last read it; returns how many."""
        return self.feedback.sync()

    def history(self, user_id: object) -> tuple[list, np.ndarray]:
        """A user's history as served: ``(item_ids, values)``, the bundle's training
        interactions with their values (ratings; the value of implicit data) merged with
        the events recorded since (:meth:`record`), in item order. Raises
        :class:`~engine.errors.UnknownIdError` for a user with neither."""
        bundle_index = self.users.get(user_id)
        live = self.feedback.live_index(user_id, bundle_index)
        if live >= 0:
            items, values = self.feedback.history(live)
        elif bundle_index is not None:
            items, values = self.feedback.bundle_history(bundle_index)
        else:
            raise UnknownIdError(f"unknown user {shorten(user_id)}: not in the bundle and no events recorded")
        return self._catalogue.items.external(items).tolist(), values

    def title(self, item_id: object) -> str:
        """A readable title (the id when the bundle has none, or the item is unknown)."""
        cat = self._catalogue
        if item_id not in cat.items:
            return str(item_id)
        return self._titles(cat, np.array([cat.items.index(item_id)]))[0]
