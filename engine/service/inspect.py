"""What the web page shows beyond the recommendation calls: a user's history and
features, a title search, the form of a new user's features, the bundle's learning
curves, a 2-D projection of item embeddings and the evaluation report.

Each function reads a serving :class:`~engine.serving.engine.Engine` (or a report file)
and returns plain JSON-ready data; the HTTP face (:mod:`engine.service.http`) serves it.
Nothing here assumes a dataset: the projection is coloured by whichever label or
categorical attribute the items have ("genres" first when there is one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.attributes import CATEGORICAL, LABELS
from engine.errors import InvalidRequest, shorten
from engine.serving.engine import Engine

# A projection draws at most this many items (a seeded sample): more only blurs the plot.
PROJECTION_ITEMS = 2000
# Values of a categorical user feature offered in the new-user form.
FORM_CHOICES = 200


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def user_history(engine: Engine, user_id: str, limit: int = 100) -> dict:
    """A user's history as served (the bundle's interactions and the events recorded
    since), highest value first, and their raw features when the bundle knows them."""
    item_ids, values = engine.history(user_id)
    order = np.argsort(-values, kind="stable")[:limit]
    bundle_index = engine.users.get(user_id)
    features = {} if bundle_index is None else engine.towers.raw_user_features(bundle_index)
    return {
        "user_id": user_id,
        "in_bundle": bundle_index is not None,
        "n_items": len(item_ids),
        "features": finite(features),
        "items": [
            {"item_id": item_ids[j], "title": engine.title(item_ids[j]), "value": float(values[j])}
            for j in order.tolist()
        ],
    }


def search_items(engine: Engine, query: str, limit: int = 20) -> list[dict]:
    """Items whose title (or id) contains ``query``, case-insensitive, most popular first."""
    query = query.strip().lower()
    if not query:
        raise InvalidRequest("the item search needs a query")
    items = engine.items
    ids = np.asarray(items.ids).astype(str)
    titles = ids if engine.titles is None else np.asarray(engine.titles).astype(str)
    text = np.char.lower(titles)
    hits = np.flatnonzero((np.char.find(text, query) >= 0) | (np.char.lower(ids) == query))
    hits = hits[np.argsort(-engine.popularity[hits], kind="stable")][:limit]
    return [{"item_id": str(ids[i]), "title": str(titles[i]) or str(ids[i])} for i in hits.tolist()]


def schema(engine: Engine) -> dict:
    """What a request can say on this bundle: the user features a new user may give
    (name, kind and, for a categorical one, its values), the item attributes filters
    read, and the retrieval sources."""
    features = []
    for encoder in engine.towers.user_pipeline.encoders:
        field: dict[str, Any] = {"name": encoder.name}
        if encoder.kind == "numeric":
            field["kind"] = "number"
        elif encoder.kind == "onehot":
            field["kind"], field["choices"] = "choice", list(encoder.vocab[:FORM_CHOICES])
        elif encoder.kind == "multihot":
            field["kind"], field["labels"] = "labels", list(encoder.vocab)
        else:  # a region read from a free text (a zip code)
            field["kind"] = "text"
        features.append(field)
    attributes = [
        {"name": name, "kind": a.kind, "values": list(a.vocabulary[:FORM_CHOICES])}
        for name, a in engine.attributes.attributes.items()
    ]
    return {
        "version": engine.version,
        "user_features": features,
        "item_attributes": attributes,
        "sources": sorted(engine.sources),
        "ranking": "blend" if engine.ranker is None else "ranker",
        "n_items": len(engine.items),
        "n_users": len(engine.users),
    }


def learning_curves(engine: Engine) -> dict:
    """Each model's learning curve as the bundle records it: per epoch for CF and the
    towers (training loss, and the validation metric when there was a validation
    share), per tree for the ranker (validation NDCG@10). Models trained before the
    curves were recorded have none."""
    models = engine.bundle.manifest.models
    curves: dict[str, list[dict]] = {}
    for name in ("cf", "towers"):
        records = models.get(name, {}).get("metrics", {}).get("learning_curve")
        if records:
            curves[name] = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    ndcg = models.get("ranker", {}).get("valid_ndcg@10")
    if ndcg:
        curves["ranker"] = [{"epoch": i + 1, "valid_ndcg@10": v} for i, v in enumerate(ndcg)]
    return finite(curves)


def models(engine: Engine) -> dict:
    """Each model's parameters and measured figures as the bundle records them (the
    learning curves aside: :func:`learning_curves`)."""
    out = {}
    for name, model in engine.bundle.manifest.models.items():
        if name == "ranker":  # its summary is flat: the parameters, then what training measured
            config = {key: model[key] for key in ("depth", "num_trees") if key in model}
            metrics = {k: v for k, v in model.items() if k not in config and k not in ("features", "valid_ndcg@10")}
            config["features"] = len(model.get("features", []))
        else:
            config = model.get("config", {})
            metrics = {k: v for k, v in model.get("metrics", {}).items() if k != "learning_curve"}
        out[name] = {"config": config, "metrics": metrics}
    return finite(out)


def colour_attribute(engine: Engine) -> str | None:
    """The item attribute a projection is coloured by: ``genres`` when the items have
    it, else the first label or categorical attribute, else none."""
    attributes = engine.attributes.attributes
    if "genres" in attributes:
        return "genres"
    for kind in (LABELS, CATEGORICAL):
        for name, a in attributes.items():
            if a.kind == kind and a.vocabulary:
                return name
    return None


def projection(engine: Engine, model: str = "towers", max_items: int = PROJECTION_ITEMS, seed: int = 0) -> dict:
    """A 2-D PCA projection of ``model``'s item vectors ("cf" or "towers"), on a seeded
    sample of at most ``max_items`` items, each with its title and a label of the
    colour attribute (:func:`colour_attribute`; an item's first label, "" for none)."""
    if model == "cf":
        vectors = np.asarray(engine.cf.X, np.float64)
    elif model == "towers":
        vectors = np.asarray(engine.tower_item_vectors, np.float64)
    else:
        raise InvalidRequest(f"model must be 'cf' or 'towers', got {shorten(model)}")
    if max_items < 3:
        raise InvalidRequest(f"max_items must be at least 3, got {max_items}")
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, max_items, replace=False)) if n > max_items else np.arange(n)
    sample = vectors[rows] - vectors[rows].mean(axis=0)
    # The two leading right singular vectors are the principal axes.
    _, singular, axes = np.linalg.svd(sample, full_matrices=False)
    xy = sample @ axes[:2].T
    variance = singular**2 / max(float((singular**2).sum()), 1e-12)
    name = colour_attribute(engine)
    labels, vocabulary = [""] * len(rows), []
    if name is not None:
        attribute = engine.attributes[name]
        vocabulary = list(attribute.vocabulary)
        values = attribute.values[rows]
        if attribute.kind == LABELS:
            flagged = values.astype(bool)
            first = np.argmax(flagged, axis=1)
            labels = [vocabulary[f] if flagged[r, f] else "" for r, f in enumerate(first.tolist())]
        else:
            labels = [vocabulary[c] if c >= 0 else "" for c in values.tolist()]
    ids = engine.items.external(rows).tolist()
    return {
        "model": model,
        "n_items": n,
        "explained_variance": [float(v) for v in variance[:2]],
        "colour_by": name,
        "labels": vocabulary,
        "points": [
            {"item_id": i, "title": engine.title(i), "x": float(x), "y": float(y), "label": label}
            for i, (x, y), label in zip(ids, xy.tolist(), labels)
        ],
    }


def evaluation(path: str | Path | None) -> dict | None:
    """The summary of a ``tandem eval-pipeline`` report (per-source candidate recall,
    Recall/NDCG@k beside the peers), or ``None`` when there is no readable report."""
    if path is None:
        return None
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        summary, k = report["summary"], report["k"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    systems = {
        name: {"recall": r.get(f"recall@{k}"), "ndcg": r.get(f"ndcg@{k}")}
        for name, r in summary.items()
        if isinstance(r, dict) and f"recall@{k}" in r
    }
    return finite(
        {
            "path": str(path),
            "data": report.get("data", ""),
            "splits": report.get("splits", []),
            "k": k,
            "n_candidates": report.get("n_candidates"),
            "systems": systems,
            "candidate_recall": summary.get("pipeline", {}).get("candidate_recall", {}),
        }
    )
