"""Milvus as a vector backend: :class:`MilvusIndex`, a
:class:`~engine.index.vector_index.VectorIndex` over one Milvus collection, and building,
tuning, publishing (aliases) and dropping such collections.

A bundle built with ``index.backend = "milvus"`` keeps its vectors in Milvus
(``index.milvus_uri``: a local file for Milvus Lite, or ``http://host:19530`` for a
server or cluster; the token, when one is needed, comes from ``$TANDEM_MILVUS_TOKEN``,
never from a file). Each index of each bundle version is one collection —
``id`` (INT64, the item's label: its dense index), ``vector`` (FLOAT_VECTOR), and one
field per item attribute of the data (``a0``, ``a1``, ...: labels as an ARRAY of label
codes, a category as its code, a number as a nullable FLOAT) — with
Tandem's factory mapped to a Milvus index type (``Flat`` -> FLAT, ``HNSW<M>`` -> HNSW,
``IVF<n>,Flat`` -> IVF_FLAT, ``IVF<n>,PQ<m>`` -> IVF_PQ) and its metric (``ip`` -> IP,
``l2`` -> L2, which Milvus reports as squared distances, as Tandem does). The bundle
holds a small JSON descriptor per index instead of a FAISS file.

- **Versions**: an engine searches the collections of the version it loaded, by name, so
  its tables and its search results always come from one version. Publishing moves one
  Milvus *alias* per index and bundle root (``tandem_<root>_<index>``) to the new
  collections right after ``current`` moves, and a rollback moves it back: the alias is
  Milvus's view of ``current``, for other readers of the collections. Pruning a version
  drops its collections.
- **Filters** are pushed into the search as a Milvus expression. A request's attribute
  filters (:class:`~engine.index.vector_index.Conditions`) become conditions on the
  attribute fields (``array_contains_any(a0, [3])``, ``a1 < 1990.0``), with the items the
  request drops beyond them (seen items, a block list) as ``id not in [...]``; other
  filters become the shorter of the allowed list (``id in [...]``) and the blocked list
  (``id not in [...]``). A list longer than ``MAX_EXPRESSION_IDS`` ids is applied after
  the search to an over-fetched result (``k`` growing fourfold) instead, since Milvus
  parses a long expression on every search (see ``make bench-milvus``).
- **Processes**: Milvus Lite opens a local file in one process at a time, so a local
  file serves one process (tests, a laptop), and ``make index`` must not run beside a
  server on the same file; ``--processes N`` and separate builders need a Milvus server.
- **Items added live** are not written to the shared collections: labels are positions in
  each process's catalogue, which processes may number differently while additions
  race, and an index must stay unchanged for its readers. :meth:`MilvusIndex.added`
  returns an index that searches the collection and, exactly, the added vectors held in
  the process, and merges the two; the next ``make index`` puts them in Milvus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.attributes import LABELS, NUMERIC, ItemAttributes
from engine.index.exact import ExactIndex
from engine.index.vector_index import Conditions, as_queries, check_metric, unpack_bits

log = logging.getLogger("tandem.index")

TOKEN_ENV = "TANDEM_MILVUS_TOKEN"
MAX_EXPRESSION_IDS = 4096  # longer allow/block lists are applied after an over-fetched search
MAX_LIMIT = 16384  # Milvus's largest top-k
MAX_RESULTS = 1 << 18  # results (queries x limit) of one search call: a 256-user batch chunk is one call
INSERT_CHUNK = 10_000
_METRICS = {"ip": "IP", "l2": "L2"}


@dataclass(frozen=True)
class MilvusTarget:
    """Where the collections live: a Milvus URI (a local ``.db`` file: Milvus Lite) and
    an optional database name. The token is read from ``$TANDEM_MILVUS_TOKEN``."""

    uri: str
    db_name: str = ""

    @classmethod
    def of(cls, uri: str, db_name: str = "") -> MilvusTarget:
        """A target with a local file URI made absolute (servers may run elsewhere)."""
        if not re.match(r"^[a-z]+://", uri):
            uri = str(Path(uri).resolve())
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        return cls(uri, db_name)


_CLIENTS: dict[MilvusTarget, tuple] = {}
_CLIENTS_LOCK = threading.Lock()


def client(target: MilvusTarget):
    """One ``MilvusClient`` per target and process, with a lock that serialises calls to
    an embedded (Milvus Lite) database."""
    with _CLIENTS_LOCK:
        if target not in _CLIENTS:
            try:
                from pymilvus import MilvusClient
            except ImportError:
                raise ImportError(
                    "the Milvus backend needs pymilvus (and milvus-lite for a local file): pip install -e '.[milvus]'"
                ) from None
            kwargs = {"uri": target.uri, "token": os.environ.get(TOKEN_ENV, "")}
            if target.db_name:
                kwargs["db_name"] = target.db_name
            _CLIENTS[target] = (MilvusClient(**kwargs), threading.Lock())
        return _CLIENTS[target]


_LOADED: set[tuple[MilvusTarget, str]] = set()  # collections this process has loaded for search


def _loaded(target: MilvusTarget, collection: str) -> None:
    """Load a collection for search once per process (a new process finds it released)."""
    if (target, collection) not in _LOADED:
        _call(target, "load_collection", collection)
        _LOADED.add((target, collection))


def _call(target: MilvusTarget, method: str, *args, **kwargs):
    milvus, lock = client(target)
    with lock:
        return getattr(milvus, method)(*args, **kwargs)


def index_type(factory: str) -> tuple[str, dict]:
    """Tandem's FAISS factory string as a Milvus index type and its build parameters."""
    if factory == "Flat":
        return "FLAT", {}
    if m := re.fullmatch(r"HNSW(\d+)", factory):
        return "HNSW", {"M": int(m.group(1)), "efConstruction": 200}
    if m := re.fullmatch(r"IVF(\d+),Flat", factory):
        return "IVF_FLAT", {"nlist": int(m.group(1))}
    if m := re.fullmatch(r"IVF(\d+),PQ(\d+)", factory):
        return "IVF_PQ", {"nlist": int(m.group(1)), "m": int(m.group(2)), "nbits": 8}
    raise ValueError(f"no Milvus index type for factory {factory!r} (Flat, HNSW<M>, IVF<n>,Flat, IVF<n>,PQ<m>)")


class MilvusIndex:
    """Search over one Milvus collection (see the module): a
    :class:`~engine.index.vector_index.VectorIndex`."""

    def __init__(
        self,
        target: MilvusTarget,
        collection: str,
        metric: str,
        dim: int,
        n_vectors: int,
        search_params: dict | None = None,
        added: np.ndarray | None = None,
        attributes: dict | None = None,
    ):
        self.target, self.collection, self.metric = target, collection, check_metric(metric)
        self._dim, self.n_base = int(dim), int(n_vectors)
        self.search_params = dict(search_params or {})  # {"ef": n} (HNSW) or {"nprobe": n} (IVF)
        self._added = None if added is None or not len(added) else ExactIndex(added, metric)
        # Attribute name -> {"field", "kind", "vocabulary"}: the item attributes the
        # collection holds, so that filters on them are searched natively.
        self.attributes = dict(attributes or {})

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self.n_base + (0 if self._added is None else len(self._added))

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, conditions: Conditions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        k = int(k)
        mask = None if allowed is None else unpack_bits(allowed, len(self))
        scores, labels = self._search_base(queries, k, None if mask is None else mask[: self.n_base], conditions)
        if self._added is not None:
            extra = None if mask is None else np.packbits(mask[self.n_base :], bitorder="little")
            more_scores, more_labels = self._added.search(queries, k, extra)
            scores, labels = _merged(
                scores, labels, more_scores, np.where(more_labels >= 0, more_labels + self.n_base, -1), k, self.metric
            )
        return scores, labels

    def _filter(self, mask: np.ndarray | None, conditions: Conditions | None) -> tuple[str, np.ndarray | None]:
        """How a search applies its filter: ``(expression, post)`` — a Milvus expression,
        and the mask to apply to an over-fetched result where the expression leaves some
        of the filter out (None: it holds all of it)."""
        if mask is None:
            return "", None
        n_allowed = int(mask.sum())
        if n_allowed == self.n_base:
            return "", None
        allow = n_allowed <= self.n_base - n_allowed
        listed = np.flatnonzero(mask) if allow else np.flatnonzero(~mask)
        native = self._attribute_expression(conditions.filters) if conditions is not None else None
        if native is not None and not (allow and len(listed) <= MAX_EXPRESSION_IDS):
            assert conditions is not None
            # The attributes in the expression; the ids the filter drops beyond them (seen
            # items, a block list) as a list.
            beyond = np.flatnonzero(conditions.mask[: self.n_base] & ~mask)
            if len(beyond) <= MAX_EXPRESSION_IDS:
                return native + (f" and id not in [{_ids(beyond)}]" if len(beyond) else ""), None
            return native, mask
        if len(listed) <= MAX_EXPRESSION_IDS:
            return (f"id in [{_ids(listed)}]" if allow else f"id not in [{_ids(listed)}]"), None
        return "", mask

    def _attribute_expression(self, filters) -> str | None:
        """Attribute filters as a Milvus expression over the collection's attribute fields
        (None when it does not hold one of the attributes)."""
        parts = []
        for name, condition in filters.items():
            field = self.attributes.get(name)
            if field is None:
                return None
            column, kind, vocabulary = field["field"], field["kind"], field.get("vocabulary", [])
            if kind == NUMERIC:
                ops = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "eq": "=="}
                parts += [f"{column} {ops[op]} {float(bound)!r}" for op, bound in condition.items()]
                continue
            op, wanted = next(iter(condition.items())) if isinstance(condition, dict) else ("any", condition)
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            codes = sorted({vocabulary.index(v) for v in wanted if v in vocabulary})
            if kind == LABELS:
                if not codes or (op == "all" and len(codes) < len(set(wanted))):
                    parts.append("id < 0")  # a label no item of the collection has: none
                else:
                    parts.append(f"array_contains_{'all' if op == 'all' else 'any'}({column}, [{_ids(codes)}])")
            elif op == "all" and len(set(wanted)) > 1:
                parts.append("id < 0")  # one category cannot be two
            else:
                parts.append(f"{column} in [{_ids(codes)}]" if codes else "id < 0")
        return " and ".join(f"({part})" for part in parts) if parts else None

    def _search_base(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None, conditions: Conditions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(queries)
        scores = np.full((n, k), -np.inf if self.metric == "ip" else np.inf, np.float32)
        labels = np.full((n, k), -1, np.int64)
        n_allowed = self.n_base if mask is None else int(mask.sum())
        if n == 0 or k == 0 or n_allowed == 0:
            return scores, labels
        expression, post = self._filter(mask, conditions)
        _loaded(self.target, self.collection)
        limit = min(k, n_allowed)
        fetch = min(self.n_base, MAX_LIMIT, limit if post is None else 4 * limit)
        while True:
            hits = []
            rows = max(1, MAX_RESULTS // fetch)  # queries per call: a bounded reply
            for at in range(0, n, rows):
                hits += _call(
                    self.target,
                    "search",
                    self.collection,
                    data=queries[at : at + rows].tolist(),
                    limit=fetch,
                    filter=expression,
                    output_fields=["id"],
                    search_params={"metric_type": _METRICS[self.metric], "params": self.search_params},
                )
            found = [[(h["id"], h["distance"]) for h in row if post is None or post[h["id"]]] for row in hits]
            short = any(len(row) < limit for row in found)
            if post is None or not short or fetch >= min(self.n_base, MAX_LIMIT):
                break
            fetch = min(self.n_base, MAX_LIMIT, fetch * 4)
        for r, row in enumerate(found):
            row = row[:k]
            labels[r, : len(row)] = [label for label, _ in row]
            scores[r, : len(row)] = [score for _, score in row]
        return scores, labels

    def added(self, vectors: np.ndarray) -> MilvusIndex:
        """An index that also finds ``vectors`` (labels from ``len(self)`` on), held in
        this process and searched exactly beside the collection; this one is unchanged."""
        vectors = as_queries(vectors, self.dim)
        held = vectors if self._added is None else np.vstack([self._added.vectors, vectors])
        return MilvusIndex(
            self.target, self.collection, self.metric, self.dim, self.n_base, self.search_params, held, self.attributes
        )

    def descriptor(self) -> dict:
        return {
            "backend": "milvus",
            "uri": self.target.uri,
            "db_name": self.target.db_name,
            "collection": self.collection,
            "metric": self.metric,
            "dim": self.dim,
            "n_vectors": self.n_base,
            "search_params": self.search_params,
            "attributes": self.attributes,
        }

    def save(self, path: str | Path) -> None:
        """Write the descriptor (where the collection is, how to search it) as JSON."""
        Path(path).write_text(json.dumps(self.descriptor(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MilvusIndex:
        d = json.loads(Path(path).read_text())
        return cls(
            MilvusTarget(d["uri"], d.get("db_name", "")),
            d["collection"],
            d["metric"],
            d["dim"],
            d["n_vectors"],
            d.get("search_params"),
            attributes=d.get("attributes"),
        )


def _ids(values) -> str:
    return ",".join(map(str, np.asarray(values).tolist()))


def _merged(a_scores, a_labels, b_scores, b_labels, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two result lists per row (missing entries: label -1)."""
    scores = np.hstack([a_scores, b_scores])
    labels = np.hstack([a_labels, b_labels])
    key = np.where(labels >= 0, -scores if metric == "ip" else scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]  # ties: the collection's (lower) labels first
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


# ------------------------------------------------------------------ building
def new_collection_name(index_name: str) -> str:
    """A collection name no other build uses: ``tandem_<time>_<random>_<index>``."""
    return f"tandem_{time.strftime('%Y%m%d%H%M%S')}_{uuid.uuid4().hex[:8]}_{index_name}"


def attribute_fields(attributes: ItemAttributes | None) -> dict:
    """The collection fields of item attributes: name -> ``{"field", "kind", "vocabulary"}``
    (fields ``a0``, ``a1``, ...: attribute names need not be valid field names)."""
    if attributes is None:
        return {}
    return {
        name: {"field": f"a{j}", "kind": a.kind, "vocabulary": list(a.vocabulary)}
        for j, (name, a) in enumerate(sorted(attributes.attributes.items()))
    }


def _attribute_values(attributes: ItemAttributes, fields: dict, rows: range) -> list[dict]:
    """Each item's attribute fields: label codes (LABELS), a category code (-1 missing),
    a number (None missing)."""
    columns: dict[str, list] = {}
    for name, field in fields.items():
        a = attributes[name]
        values = a.values[rows.start : rows.stop]
        if a.kind == LABELS:
            columns[field["field"]] = [np.flatnonzero(row).tolist() for row in values]
        elif a.kind == NUMERIC:
            columns[field["field"]] = [None if v != v else v for v in values.astype(np.float64).tolist()]
        else:
            columns[field["field"]] = values.astype(np.int64).tolist()
    return [{key: column[j] for key, column in columns.items()} for j in range(len(rows))]


def create(
    target: MilvusTarget,
    collection: str,
    vectors: np.ndarray,
    metric: str,
    factory: str,
    attributes: ItemAttributes | None = None,
) -> dict:
    """Create ``collection`` holding ``vectors`` (ids ``0..n-1``) with the index of
    ``factory``, and the items' ``attributes`` as scalar fields; returns those fields
    (:func:`attribute_fields`)."""
    from pymilvus import DataType, MilvusClient

    vectors = np.ascontiguousarray(vectors, np.float32)
    kind, params = index_type(factory)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
    fields = attribute_fields(attributes)
    for field in fields.values():
        if field["kind"] == LABELS:
            width = max(1, len(field["vocabulary"]))
            schema.add_field(field["field"], DataType.ARRAY, element_type=DataType.INT64, max_capacity=width)
        elif field["kind"] == NUMERIC:
            schema.add_field(field["field"], DataType.FLOAT, nullable=True)
        else:
            schema.add_field(field["field"], DataType.INT64)
    milvus, lock = client(target)
    with lock:
        index_params = milvus.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=kind, metric_type=_METRICS[metric], params=params)
        milvus.create_collection(collection, schema=schema, index_params=index_params)
        for start in range(0, len(vectors), INSERT_CHUNK):
            part = vectors[start : start + INSERT_CHUNK]
            rows = [{"id": start + j, "vector": v} for j, v in enumerate(part.tolist())]
            if fields:
                assert attributes is not None
                for row, values in zip(rows, _attribute_values(attributes, fields, range(start, start + len(part)))):
                    row.update(values)
            milvus.insert(collection, rows)
        milvus.flush(collection)
        milvus.load_collection(collection)
    _LOADED.add((target, collection))
    return fields


def build_index(
    vectors: np.ndarray,
    metric: str,
    factory: str,
    target: MilvusTarget,
    index_name: str,
    queries: np.ndarray | None = None,
    k: int = 10,
    recall_floor: float = 0.95,
    n_queries: int = 1000,
    seed: int = 0,
    attributes: ItemAttributes | None = None,
):
    """A new collection over ``vectors`` (and the items' ``attributes``, for filters)
    with the index of ``factory``, its search
    parameter raised (HNSW ``ef``, IVF ``nprobe``) until recall@k against exact search
    reaches ``recall_floor``, as :func:`engine.index.faiss_index.build_index` does for
    FAISS. Returns ``(MilvusIndex, IndexReport)``; the caller drops the collection when
    it does not publish."""
    from engine.index.faiss_index import IndexReport, _exact_scores, tie_aware_recall

    vectors = np.ascontiguousarray(vectors, np.float32)
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    if queries is None:
        queries = vectors[rng.choice(n, min(n_queries, n), replace=False)]
    queries = np.ascontiguousarray(queries, np.float32)
    collection = new_collection_name(index_name)
    start = time.perf_counter()
    fields = create(target, collection, vectors, metric, factory, attributes)
    build_seconds = time.perf_counter() - start
    kind, params = index_type(factory)
    kk = min(k, n)
    exact_scores, _ = ExactIndex(vectors, metric).search(queries, kk)

    def measured(search_params: dict) -> tuple[MilvusIndex, float]:
        index = MilvusIndex(target, collection, metric, dim, n, search_params, attributes=fields)
        _, labels = index.search(queries, kk)
        return index, tie_aware_recall(_exact_scores(vectors, queries, labels, metric), labels, exact_scores, metric)

    if kind == "HNSW":
        ef = 16
        while True:
            index, recall = measured({"ef": max(ef, kk)})
            if recall >= recall_floor or ef >= 1024:
                break
            ef *= 2
    elif kind.startswith("IVF"):
        nprobe = 1
        while True:
            index, recall = measured({"nprobe": nprobe})
            if recall >= recall_floor or nprobe >= params["nlist"]:
                break
            nprobe = min(2 * nprobe, params["nlist"])
    else:
        index, recall = measured({})
    report = IndexReport(factory, metric, n, dim, build_seconds, float(recall), kk, len(queries), index.search_params)
    return index, report


def drop(target: MilvusTarget, collections: list[str]) -> None:
    """Drop collections (those that exist)."""
    for name in collections:
        if _call(target, "has_collection", name):
            _call(target, "drop_collection", name)
        _LOADED.discard((target, name))


def alias_name(root: str | Path, index_name: str) -> str:
    """The alias of index ``index_name`` for the bundle root ``root``."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"tandem_{digest}_{index_name}"


def point_aliases(root: str | Path, indexes: dict) -> None:
    """Move each Milvus index's alias (of this root) to the collection of ``indexes``
    (a manifest's ``indexes``); others are left alone."""
    for name, report in indexes.items():
        where = report.get("milvus")
        if not where:
            continue
        target, alias = MilvusTarget(where["uri"], where.get("db_name", "")), alias_name(root, name)
        existing = _call(target, "list_aliases").get("aliases", [])
        _call(target, "alter_alias" if alias in existing else "create_alias", where["collection"], alias)


def collection_of_alias(target: MilvusTarget, alias: str) -> str | None:
    try:
        return _call(target, "describe_alias", alias).get("collection_name")
    except Exception:  # noqa: BLE001 - no such alias
        return None


def drop_version(indexes: dict) -> None:
    """Drop the collections of a version's indexes (when the version is pruned). Best
    effort: a collection that cannot be dropped is logged, never a failed publish."""
    for report in indexes.values():
        where = report.get("milvus")
        if not where:
            continue
        try:
            drop(MilvusTarget(where["uri"], where.get("db_name", "")), [where["collection"]])
        except Exception as e:  # noqa: BLE001
            log.warning(json.dumps({"event": "milvus_drop_failed", "collection": where["collection"], "error": str(e)}))
