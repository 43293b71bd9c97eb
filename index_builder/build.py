"""From trained models and their dataset to a published bundle.

:func:`build_bundle` exports item vectors, builds the FAISS indexes, measures each one's
recall@k against exact search, refuses to publish below the floor, writes the tables the
engine serves from (id maps, popularity globally and per user segment, each user's seen
items, item genres and titles) and publishes the bundle atomically.

Indexes (labels are dense item indices):

- ``cf_l2``: CF item vectors ``x``, squared L2 — "more like this";
- ``cf_ip``: ``[x, offset]`` with ``offset = item bias + item mean + global mean``, inner
  product; a user queries with ``[w, 1]``, so the score is the CF prediction minus the
  user's own bias (constant per user, so the ranking is the prediction's);
- ``towers_ip``: L2-normalised item-tower vectors, inner product with the user-tower
  vector.

Per-user tables searched once here rather than at every request: each item's nearest
neighbours in ``cf_l2`` (the "recent likes" source) and each user's top unseen items in
``cf_ip`` and ``towers_ip`` (the CF and two-tower sources, :func:`user_top_items`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.data import Dataset
from engine.data.attributes import ItemAttributes
from engine.errors import TandemError
from engine.index import bundle
from engine.index import faiss_index as ann
from engine.index.milvus_index import MilvusTarget
from engine.models.cf import CFModel
from engine.models.embedding import EmbeddingModel
from engine.models.features import segment_labels
from engine.models.ranker import Ranker
from engine.models.towers import TwoTowerModel
from engine.serving.features import feature_groups, shrunk_mean
from engine.serving.retrieval import positions_in_rows
from engine.settings import IndexConfig

DEFAULT_SEGMENT_KEYS = ("occupation", "zip_region", "age_band")
SEGMENT_TOP = 500  # items kept per segment


class PublishRefused(TandemError):
    """An index missed the recall floor; nothing was published."""


def user_segments(dataset: Dataset, key: str) -> np.ndarray:
    """Each user's segment label ``[n_users]`` for a segment key ("" when unknown);
    see :func:`engine.models.features.segment_labels` for the keys."""
    table = dataset.user_features
    return segment_labels(key, table.columns if table is not None else {}, dataset.n_users)


RECENT_LIKED = 5  # items per user kept for the "neighbours of recent likes" source
ITEM_NEIGHBOURS = 32  # nearest CF neighbours kept per item for that source


def item_neighbours(index, vectors: np.ndarray, m: int = ITEM_NEIGHBOURS, batch: int = 16384, log=print) -> np.ndarray:
    """Each item's ``m`` nearest items by squared distance ``[n_items, m]`` (nearest
    first, the item itself excluded, ``-1`` pads), searched in ``index`` (an L2 index
    over ``vectors`` with its tuned search parameters set). The engine reads these
    instead of searching at request time."""
    n = len(vectors)
    m = min(m, max(n - 1, 0))
    out = np.full((n, m), -1, np.int32)
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        _, labels = index.search(vectors[rows], m + 1)
        for r, found in zip(rows, labels):
            found = found[(found >= 0) & (found != r)][:m]
            out[r, : len(found)] = found
        if n > batch:
            log(f"  item neighbours: {rows[-1] + 1:,} / {n:,} items")
    return out


USER_TOP_ITEMS = IndexConfig.user_top_k  # items kept per user for the CF and two-tower sources (0: no tables)


def user_top_items(
    index,
    queries: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    k: int = USER_TOP_ITEMS,
    labels_per_block: int = 1 << 22,
    log=print,
    name: str = "",
) -> np.ndarray:
    """Each user's first ``k`` unseen items as ``index`` ranks them for the user's query
    ``queries[u]``: ``[n_users, k]`` int32, best first, ``-1`` padding a row with fewer
    than ``k`` unseen items in the whole result (a tiny catalogue, or an HNSW graph that
    reaches fewer items from that query, as a live search would). Seen items are the CSR
    rows ``seen_indptr`` / ``seen_indices``.

    A known user's request that excludes their seen items (the default) is then served a
    prefix of this row instead of searching the index (see ``retrieval._AnnSource``).
    Each user is searched ``k`` plus their number of seen items deep and the seen items
    are dropped, so the row holds ``k`` unseen items whenever the index returns that
    many. Users are searched in blocks of similar history length, so one heavy user
    does not widen the search of everyone."""
    n_users, n_items = len(queries), len(index)
    k = min(k, n_items)
    out = np.full((n_users, k), -1, np.int32)
    n_seen = np.diff(seen_indptr)
    order = np.argsort(n_seen, kind="stable")

    def width_at(position: int) -> int:  # the search depth of the position-th user in order
        return max(1, int(min(k + n_seen[order[min(position, n_users - 1)]], n_items)))

    start, reported = 0, 0
    while start < n_users:
        # Rows per block: as many as fit the label budget at the block's widest search
        # (its last user's, as the order is by history length).
        size = max(1, labels_per_block // width_at(start))
        while size > 1 and size * width_at(start + size - 1) > labels_per_block:
            size = max(1, labels_per_block // width_at(start + size - 1))
        block = order[start : start + size]
        width = width_at(start + len(block) - 1)
        _, labels = index.search(queries[block], width)
        rows = np.repeat(np.arange(len(block), dtype=np.int64), width)
        flat = labels.ravel().astype(np.int64)
        # The block's seen items as sorted (row, item) keys, to drop them by binary search.
        lengths = n_seen[block]
        firsts = np.repeat(seen_indptr[block] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        seen = np.sort(
            np.repeat(np.arange(len(block), dtype=np.int64), lengths) * n_items
            + seen_indices[firsts + np.arange(lengths.sum())]
        )
        wanted = rows * n_items + flat
        keep = flat >= 0
        if len(seen):
            keep &= seen[np.minimum(np.searchsorted(seen, wanted), len(seen) - 1)] != wanted
        rows, flat = rows[keep], flat[keep]
        position = positions_in_rows(rows)
        take = position < k
        out[block[rows[take]], position[take]] = flat[take]
        start += len(block)
        if n_users > 16384 and (start - reported >= 16384 or start == n_users):
            log(f"  user top items ({name}): {start:,} / {n_users:,} users")
            reported = start
    return out


def recent_liked(dataset: Dataset, n: int = RECENT_LIKED) -> np.ndarray:
    """Each user's ``n`` most recent liked items ``[n_users, n]`` (latest first, ``-1``
    pads; liked: :func:`engine.data.dataset.liked_mask`)."""
    liked = dataset.liked()
    u, i, t = dataset.user_idx[liked], dataset.item_idx[liked], dataset.timestamps[liked]
    order = np.lexsort((-np.arange(len(u)), -t, u))  # by user, then newest first
    u, i = u[order], i[order]
    starts = np.searchsorted(u, np.arange(dataset.n_users))
    rank = np.arange(len(u)) - starts[u]
    out = np.full((dataset.n_users, n), -1, np.int32)
    keep = rank < n
    out[u[keep], rank[keep]] = i[keep]
    return out


ITEM_COOCCURRENCE = 100  # co-occurring items kept per item (a ranker feature)


def item_cooccurrence(dataset: Dataset, k: int = ITEM_COOCCURRENCE, block_pairs: int = 1 << 24):
    """Each item's ``k`` most similar items by cosine similarity of their users
    (``|U_i & U_j| / sqrt(|U_i| |U_j|)``, item-based collaborative filtering):
    ``(neighbours [n_items, k] int32, -1 pads; similarities [n_items, k] float32)``,
    most similar first. Sparse throughout: items are taken in
    blocks whose co-occurring pairs number at most about ``block_pairs`` (bounded by each
    item's users' history lengths), so time and memory follow the co-occurrences, not the
    square of the catalogue."""
    n = dataset.n_items
    k = min(k, max(n - 1, 0))
    item_users = dataset.item_users().astype(np.float32)
    item_users.data[:] = 1.0
    item_users.sort_indices()
    users_items = item_users.T.tocsr()
    norms = np.sqrt(np.diff(item_users.indptr)).astype(np.float32)
    norms[norms == 0] = 1.0
    # An upper bound of each item's co-occurring pairs: its users' history lengths summed.
    bound = item_users @ np.diff(users_items.indptr).astype(np.float64)
    neighbours, similarities = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)
    if k == 0:
        return neighbours, similarities
    start = 0
    while start < n:
        stop = start + 1 + int(np.searchsorted(np.cumsum(bound[start + 1 :]), block_pairs))
        stop = min(stop, n)
        shared = (item_users[start:stop] @ users_items).tocoo()
        rows, cols = shared.row.astype(np.int64), shared.col.astype(np.int64)
        other = rows + start != cols  # not itself
        rows, cols, counts = rows[other], cols[other], shared.data[other]
        sims = counts / norms[rows + start] / norms[cols]
        order = np.argsort(rows * 2.0 + (1.0 - sims))  # by item, most similar first (sims in [0, 1])
        rows, cols, sims = rows[order], cols[order], sims[order]
        rank = positions_in_rows(rows)
        take = rank < k
        neighbours[rows[take] + start, rank[take]] = cols[take]
        similarities[rows[take] + start, rank[take]] = sims[take]
        start = stop
    return neighbours, similarities


EASE_FEATURE_MAX_ITEMS = 4000  # above it the dense inverse costs too much: no EASE feature
EASE_LAMBDA_PER_INTERACTION = 5.0  # EASE's lambda: this many times the mean interactions per item


def item_ease_weights(dataset: Dataset, k: int = ITEM_COOCCURRENCE, max_items: int = EASE_FEATURE_MAX_ITEMS):
    """For each item ``i``, the ``k`` items ``j`` of largest ``|B[j, i]|`` in EASE's
    item-item weights (:func:`engine.evaluation.peers.ease_weights`; a user's EASE score
    of ``i`` is ``sum_j x_uj B[j, i]``): ``(items [n_items, k] int32, -1 pads; weights
    [n_items, k] float32)``. Lambda scales with the data: ``EASE_LAMBDA_PER_INTERACTION``
    times the mean interactions per item. Empty tables above ``max_items`` items (the
    feature is then missing)."""
    from engine.evaluation.peers import _binary, ease_weights

    n = dataset.n_items
    if n > max_items or n < 2:
        return np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32)
    k = min(k, n - 1)
    lam = max(EASE_LAMBDA_PER_INTERACTION * dataset.n_ratings / n, 1.0)
    weights = ease_weights(_binary(dataset), lam).astype(np.float32)  # [j, i]
    incoming = weights.T  # row i: B[:, i]
    top = np.argpartition(-np.abs(incoming), k - 1, axis=1)[:, :k]
    values = np.take_along_axis(incoming, top, axis=1)
    order = np.argsort(-np.abs(values), axis=1, kind="stable")
    top, values = np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)
    return np.where(values != 0, top, -1).astype(np.int32), values.astype(np.float32)


def like_rates(dataset: Dataset) -> dict[str, np.ndarray]:
    """Ranker features of explicit feedback: each item's share of interactions that are
    likes (``item_like_rate``) and its mean rating (``item_mean_rating``), and each
    user's share of likes (``user_like_rate``), float32, every one shrunk toward the
    global value (:func:`engine.serving.features.shrunk_mean`). Constant on implicit
    data, where every interaction is a like."""
    liked = dataset.liked().astype(np.float64)
    ratings = dataset.ratings.astype(np.float64)
    like_all = float(liked.mean()) if len(liked) else 0.0
    mean_all = float(ratings.mean()) if len(ratings) else 0.0

    def shrunk(index, values, n, prior):
        total = np.bincount(index, weights=values, minlength=n)
        return shrunk_mean(total, np.bincount(index, minlength=n), prior).astype(np.float32)

    return {
        "item_like_rate": shrunk(dataset.item_idx, liked, dataset.n_items, like_all),
        "item_mean_rating": shrunk(dataset.item_idx, ratings, dataset.n_items, mean_all),
        "user_like_rate": shrunk(dataset.user_idx, liked, dataset.n_users, like_all),
    }


TREND_SHARE = 0.1  # item_trend counts the latest tenth of the training period


def item_history_tables(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(trend, age)`` ``[n_items]`` float32 for the ranker's features
    (:mod:`engine.serving.features`): log(1 + each item's interactions in the latest
    tenth of the data's time span), and the share of that span since its first
    interaction (0 for an item without one). Zeros when the data has no timestamps."""
    n, t = dataset.n_items, dataset.timestamps
    trend, age = np.zeros(n, np.float32), np.zeros(n, np.float32)
    if not dataset.has_timestamps:
        return trend, age
    end, span = int(t.max()), float(t.max() - t.min())
    latest = t >= end - TREND_SHARE * span
    trend[:] = np.log1p(np.bincount(dataset.item_idx[latest], minlength=n))
    first = np.full(n, end, np.int64)
    np.minimum.at(first, dataset.item_idx, t)
    age[:] = (end - first) / span
    return trend, age


def _check_models(dataset: Dataset, cf: CFModel, towers: TwoTowerModel) -> None:
    for name, model in (("CF", cf), ("two-tower", towers)):
        if model.items != dataset.items or model.users != dataset.users:
            raise TandemError(
                f"the {name} model was trained on other users/items than the dataset given "
                "(retrain it on this dataset: make train)"
            )


def build_bundle(
    dataset: Dataset,
    cf: CFModel,
    towers: TwoTowerModel,
    root: str | Path,
    *,
    factory: str | None = None,
    recall_floor: float = IndexConfig.recall_floor,
    k: int = IndexConfig.recall_k,
    n_queries: int = 1000,
    keep: int = IndexConfig.keep,
    segment_keys=DEFAULT_SEGMENT_KEYS,
    exact_below: int = ann.EXACT_BELOW,
    user_top_k: int = USER_TOP_ITEMS,
    ranker: Ranker | None = None,
    milvus: MilvusTarget | None = None,
    log=print,
) -> Path:
    """Build every index and table for ``dataset`` and publish a new bundle version.

    Args:
        root: the bundle root (``paths.bundles``); the new version becomes ``current``.
        factory: a FAISS factory string for all indexes; ``None`` chooses by catalogue
            size (exact below ``exact_below`` items, HNSW, or IVF-PQ when floats do not fit).
        recall_floor: publishing is refused when an index's recall@k is below it.
        user_top_k: items per user in the CF and two-tower sources' precomputed tables
            (:func:`user_top_items`); 0 builds none, and every request searches.
        ranker: a learned ranker (:mod:`index_builder.ranker`) stored with the bundle;
            without one the engine ranks by the blend.
        milvus: build the indexes as collections of this Milvus (``index.backend =
            "milvus"``, :mod:`engine.index.milvus_index`) instead of FAISS files; they are
            dropped again when nothing is published.

    Returns the published bundle's directory. Raises :class:`PublishRefused` (and
    publishes nothing) when an index misses the floor.
    """
    _check_models(dataset, cf, towers)
    if ranker is not None:
        attributes = ItemAttributes.of_features(dataset.item_features)
        expected = list(feature_groups((towers.name, cf.name), attributes, ranker.rating is not None))
        if ranker.feature_names != expected:
            raise TandemError(
                f"the ranker was trained on features {ranker.feature_names}, this data's bundle computes "
                f"{expected} (other item attributes?): retrain it on this data (make train)"
            )
    root = Path(root)
    created: dict = {}  # index name -> its report, for the Milvus collections made so far
    try:
        with bundle.staging(root) as staged:
            return _build(
                dataset, cf, towers, root, staged, factory, recall_floor, k, n_queries, keep, segment_keys,
                exact_below, user_top_k, ranker, milvus, created, log,
            )  # fmt: skip
    except BaseException:
        if created:  # nothing was published: its collections go too
            from engine.index import milvus_index

            milvus_index.drop_version(created)
        raise


def _build(
    dataset, cf, towers, root, staged, factory, recall_floor, k, n_queries, keep, segment_keys, exact_below,
    user_top_k, ranker, milvus, created, log,
) -> Path:  # fmt: skip
    rng = np.random.default_rng(0)
    layout = bundle.BundleLayout(staged)
    cf.save(layout.model("cf"))
    towers.save(layout.model("towers"))
    if ranker is not None:
        ranker.save(layout.model("ranker"))

    users_sample = rng.choice(dataset.n_users, min(n_queries, dataset.n_users), replace=False)
    # "More like this" by squared distance between CF vectors, then one inner-product
    # index per embedding model (its retrieval source: "ANN over model M").
    specs: dict[str, tuple[np.ndarray, str, np.ndarray | None]] = {"cf_l2": (cf.X, "l2", None)}
    models: list[EmbeddingModel] = [cf, towers]
    for model in models:
        specs[f"{model.name}_ip"] = (
            model.retrieval_item_vectors(),
            "ip",
            model.retrieval_user_vectors(users_sample),
        )
    ui = dataset.user_items()
    seen_indptr, seen_indices = ui.indptr.astype(np.int64), ui.indices.astype(np.int32)
    # Every user's query vector for the sources whose top items are tabled per user.
    every_user = np.arange(dataset.n_users)
    user_queries = (
        {f"{model.name}_ip": model.retrieval_user_vectors(every_user) for model in models} if user_top_k > 0 else {}
    )
    user_top: dict[str, np.ndarray] = {}
    reports = {}
    for name, (vectors, metric, queries) in specs.items():
        chosen = factory or ann.choose_factory(len(vectors), vectors.shape[1], exact_below=exact_below)
        if milvus is None:
            index, report = ann.build_index(
                vectors, metric, chosen, queries=queries, k=k, recall_floor=recall_floor, n_queries=n_queries
            )
        else:
            from engine.index import milvus_index

            index, report = milvus_index.build_index(
                vectors, metric, chosen, milvus, name, queries=queries, k=k, recall_floor=recall_floor,
                n_queries=n_queries, attributes=ItemAttributes.of_features(dataset.item_features),
            )  # fmt: skip
            created[name] = {"milvus": index.descriptor()}
        log(
            f"  {name}: {report.factory} ({metric}) on {report.n_vectors:,} x {report.dim}, "
            f"recall@{report.k} {report.recall_at_k:.4f} {report.search_params or ''} "
            f"built in {report.build_seconds:.1f} s"
        )
        if report.recall_at_k < recall_floor:
            hint = ""
            if name == "cf_ip" and cf.history_vectors is not None:
                # Measured: HNSW's inner-product recall@10 on a 20k-item set fell from 0.96-0.98
                # (plain MF) to 0.15-0.59 with history factors; the scores it found were within 1%.
                hint = (
                    " (this CF has history factors, whose user vectors graph indexes search poorly by "
                    "inner product: train it with cf.history_factors = false, or use an exact index, "
                    "index.factory = 'Flat')"
                )
            raise PublishRefused(
                f"index {name} ({report.factory}, {report.search_params}) measured "
                f"recall@{report.k} = {report.recall_at_k:.4f} on {report.n_queries} queries, "
                f"below the floor {recall_floor}; nothing was published{hint}"
            )
        index.save(layout.index(name) if milvus is None else layout.milvus_index(name))
        reports[name] = report.to_json() if milvus is None else {**report.to_json(), **created[name]}
        if name == "cf_l2":
            neighbours = item_neighbours(index, cf.X, log=log)
        elif name in user_queries:
            user_top[name] = user_top_items(
                index, user_queries[name], seen_indptr, seen_indices, user_top_k, log=log, name=name
            )

    layout.save_table("item_ids", dataset.items.ids)
    layout.save_table("user_ids", dataset.users.ids)
    layout.save_table("popularity", dataset.item_counts().astype(np.float32))
    layout.save_table("seen_indptr", seen_indptr)
    layout.save_table("seen_indices", seen_indices)
    layout.save_table("seen_values", ui.data.astype(np.float32))
    for name, top in user_top.items():
        layout.save_table(f"user_top_{name}", top)
    layout.save_table("recent_liked", recent_liked(dataset))
    layout.save_table("item_neighbours", neighbours)
    trend, age = item_history_tables(dataset)
    for name, table in like_rates(dataset).items():
        layout.save_table(name, table)
    cooccurring, cooccurrence = item_cooccurrence(dataset)
    layout.save_table("item_cooccurring", cooccurring)
    layout.save_table("item_cooccurrence", cooccurrence)
    ease_from, ease_weight = item_ease_weights(dataset)
    layout.save_table("item_ease_from", ease_from)
    layout.save_table("item_ease_weight", ease_weight)
    layout.save_table("item_trend", trend)
    layout.save_table("item_age", age)
    journal = root / bundle.ADDED_ITEMS  # items added live so far travel with the bundle
    # Only the items added to this dataset's bundles (an item belongs to its dataset).
    added = [
        r
        for r in bundle.read_added_items(journal)[0]
        if r["item_id"] not in dataset.items and r.get("dataset") in (None, dataset.name)
    ]
    if added:
        bundle.append_added_items(layout.added_items, added)
        log(f"  carrying {len(added)} item(s) added live (from {journal})")
    # The exported item vectors themselves, beside the indexes built from them.
    layout.save_table("cf_item_vectors", cf.X)
    layout.save_table("cf_item_offsets", cf.item_offsets)
    layout.save_table("tower_item_vectors", towers.item_vectors)
    if dataset.item_titles is not None:
        layout.save_table("item_titles", dataset.item_titles)
    # Every item attribute of the data (genres, tags, category, price, ...), for filters.
    item_attributes = layout.save_attributes(ItemAttributes.of_features(dataset.item_features))

    segments = {}
    for key in segment_keys:
        labels = user_segments(dataset, key)
        values, user_segment = np.unique(labels, return_inverse=True)
        if len(values) == 1 and values[0] == "":
            continue
        seg_of_rating = user_segment[dataset.user_idx]
        top_n = min(SEGMENT_TOP, dataset.n_items)
        top = np.zeros((len(values), top_n), np.int32)
        top_counts = np.zeros((len(values), top_n), np.float32)
        for s in range(len(values)):
            c = np.bincount(dataset.item_idx[seg_of_rating == s], minlength=dataset.n_items)
            order = np.argsort(-c, kind="stable")[:top_n]
            top[s], top_counts[s] = order, c[order]
        layout.save_segment(key, "values", values.astype(str))
        layout.save_segment(key, "user", user_segment.astype(np.int32))
        layout.save_segment(key, "top_items", top)
        layout.save_segment(key, "top_counts", top_counts)
        segments[key] = {"n_segments": int(len(values)), "top_n": int(top_n)}

    manifest = bundle.Manifest(
        dataset=bundle.DatasetInfo(
            name=dataset.name,
            fingerprint=dataset.fingerprint(),
            n_users=dataset.n_users,
            n_items=dataset.n_items,
            n_ratings=dataset.n_ratings,
            # What a like is on this data: the engine applies the same rule to the ratings
            # given with a request (engine.data.dataset.liked_mask).
            implicit=dataset.implicit,
        ),
        # The bytes of the root's feedback log these interactions include: the engine
        # replays the events after them (engine.serving.feedback).
        feedback={"offset": int(dataset.feedback_offset)},
        models={
            "cf": {
                "n_features": int(cf.X.shape[1]),
                "config": json.loads((layout.model("cf") / "cf.json").read_text())["config"],
                "metrics": cf.metrics,
            },
            "towers": {
                "output_dim": int(towers.item_vectors.shape[1]),
                "config": json.loads((layout.model("towers") / "towers.json").read_text())["config"],
                "metrics": towers.metrics,
            },
            **({"ranker": ranker.to_summary()} if ranker is not None else {}),
        },
        indexes=reports,
        user_top_items={"k": int(user_top_k), "indexes": sorted(user_top)},
        recall_floor=recall_floor,
        segments=segments,
        item_attributes=item_attributes,
    )
    published = bundle.publish(staged, root, manifest, keep=keep)
    log(f"published {published.name} -> {root / bundle.CURRENT}")
    return published
