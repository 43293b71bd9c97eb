"""``tandem eval-pipeline``: the whole two-stage pipeline on any data and split, beside
the simple peers measured in the same run.

For each split (one, or five folds): train and publish what ``make train index`` would
from the training part (:func:`~index_builder.train.train_and_publish`), load the
bundle, and evaluate it (:func:`engine.evaluation.pipeline.evaluate_engine`: Recall and
NDCG at ``k``, per-source candidate recall, latency). The peers
(:mod:`engine.evaluation.peers`: popularity, implicit ALS, EASE) are fitted on the same
training part and scored on the same test part with the same relevance rule and
exclusions. The report is JSON, a table and (with matplotlib) a PNG bar chart.

Splits (:data:`SPLITS`):

- ``u1`` .. ``u5``: an ML-100K predefined fold; ``folds``: all five on ML-100K, else five
  seeded per-user random splits (seeds ``seed`` .. ``seed + 4``);
- ``temporal``: each user's latest ``test_fraction`` of interactions;
- ``random``: a seeded random ``test_fraction`` of each user's interactions;
- ``last``: each user's latest ``last_n`` interactions.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine import data
from engine.errors import ConfigError
from engine.evaluation import peers
from engine.evaluation.pipeline import evaluate_engine
from engine.serving.engine import Engine, EngineConfig
from engine.settings import RankerConfig
from index_builder.ranker import fit_ranker, ranker_examples
from index_builder.train import train_and_publish

FOLDS = ("u1", "u2", "u3", "u4", "u5")
SPLITS = ("folds", *FOLDS, "temporal", "random", "last")
SYSTEMS = ("pipeline", "popularity", "implicit_als", "ease")
PEERS = SYSTEMS[1:]


def make_splits(
    dataset: data.Dataset | None,
    directory: str | Path | None,
    split: str = "folds",
    test_fraction: float = 0.2,
    last_n: int = 1,
    seed: int = 0,
) -> list[tuple[str, data.Split]]:
    """The named train/test splits of ``split`` (see the module). ``directory`` is the
    ML-100K directory for its predefined folds (None for other data); ``dataset`` is
    the loaded data (needed by every other split)."""
    has_folds = directory is not None and Path(directory, "u1.base").is_file()
    if split in FOLDS or (split == "folds" and has_folds):
        if directory is None or not has_folds:
            raise ConfigError(
                f"split {split!r} is an ML-100K fold: the data has no {split}.base; use folds or temporal"
            )
        folder = directory  # (narrowed, for the comprehension)
        return [(fold, data.predefined_split(folder, fold[1:])) for fold in (FOLDS if split == "folds" else [split])]
    if dataset is None:
        raise ConfigError(f"split {split!r} needs the dataset")
    if split == "folds":
        return [
            (f"random{s}", data.random_split(dataset, test_fraction, seed=s, per_user=True))
            for s in range(seed, seed + 5)
        ]
    if split == "temporal":
        return [("temporal", data.temporal_split(dataset, test_fraction))]
    if split == "random":
        return [("random", data.random_split(dataset, test_fraction, seed=seed, per_user=True))]
    if split == "last":
        return [(f"last{last_n}", data.leave_last_n(dataset, last_n))]
    raise ConfigError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


def evaluate_pipeline(
    splits: list[tuple[str, data.Split]],
    k: int = 10,
    n_candidates: int = 500,
    min_rating: float | str = "auto",
    engine_config: EngineConfig | None = None,
    config: dict[str, Any] | None = None,
    peer_names=PEERS,
    ease_max_items: int = peers.EASE_MAX_ITEMS,
    data_name: str = "",
    log: Callable[[str], None] = print,
    ablation: bool = True,
) -> dict:
    """The pipeline and the peers on every split; per-split results and their means.
    Each split's bundle is what ``make train index`` would publish from its training
    part (with ``config``). With ``ablation`` (and a ranker), each split also reports
    the blend alone and the ranker without each feature group."""
    if config is None:
        from engine.config import load_config

        config = load_config()
    per_split = []
    quiet = lambda line: None  # noqa: E731
    for name, (train, test) in splits:
        log(f"{name}: {train.n_ratings:,} training and {test.n_ratings:,} test interactions")
        row: dict[str, Any] = {"split": name, "n_train": train.n_ratings, "n_test": test.n_ratings}
        split_config = _ranker_holdout_like(config, name)
        ranker_config = RankerConfig.from_dict(split_config["ranker"])
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            examples = ranker_examples(train, split_config, ranker_config, log=quiet) if ranker_config.enabled else None
            train_and_publish(train, root, split_config, log=quiet, examples=examples)
            fit_s = time.perf_counter() - start
            engine = Engine.load(root, engine_config)
            row["pipeline"] = {"fit_s": fit_s, **evaluate_engine(engine, test, k, n_candidates, min_rating)}
            if ablation and examples is not None and engine.ranker is not None:
                row["ablation"] = _ablation(engine, examples, ranker_config, test, k, n_candidates, min_rating)
        for peer in peer_names:
            row[peer] = _run_peer(peer, train, test, k, min_rating, ease_max_items)
        per_split.append(row)
        log("  " + ", ".join(_brief(system, row[system], k) for system in SYSTEMS if system in row))
    return {
        "data": data_name,
        "splits": [name for name, _ in splits],
        "k": k,
        "n_candidates": n_candidates,
        "min_rating": min_rating,
        "summary": _summary(per_split, k),
        "per_split": per_split,
    }


def _ranker_holdout_like(config: dict[str, Any], split: str) -> dict[str, Any]:
    """``config`` with the ranker's held-out interactions drawn as the split draws its
    test part (``ranker.holdout = "auto"`` only): the ranker learns to predict what the
    evaluation asks — the future for a temporal split, a random share for random folds."""
    if config["ranker"]["holdout"] != "auto":
        return config
    holdout = "temporal" if split == "temporal" or split.startswith("last") else "random"
    return {**config, "ranker": {**config["ranker"], "holdout": holdout}}


def _ablation(engine, examples, ranker_config, test, k: int, n_candidates: int, min_rating) -> dict[str, dict]:
    """Recall and NDCG at ``k`` of the blend alone and of rankers fitted on the same
    examples without each feature group, on the same engine and test part."""
    keys = (f"recall@{k}", f"ndcg@{k}")
    served = engine.ranker
    out = {}
    try:
        engine.use_ranker(None)
        found = evaluate_engine(engine, test, k, n_candidates, min_rating)
        out["blend"] = {key: found[key] for key in keys}
        for group in dict.fromkeys(examples.groups.values()):
            ranker = fit_ranker(examples, ranker_config, without=[group], log=lambda line: None)
            ranker.rating = served.rating  # the served rating model (train_ranker's), as the full ranker's
            engine.use_ranker(ranker)
            found = evaluate_engine(engine, test, k, n_candidates, min_rating)
            out[f"without {group}"] = {key: found[key] for key in keys}
    finally:
        engine.use_ranker(served)
    return out


def _run_peer(peer: str, train, test, k: int, min_rating, ease_max_items: int) -> dict:
    if peer == "popularity":
        return peers.popularity(train, test, k, min_rating)
    if peer == "implicit_als":
        try:
            return peers.implicit_als(train, test, k, min_rating)
        except ImportError:
            return {"skipped": "the implicit package is not installed (pip install implicit, or make install-bench)"}
    if peer == "ease":
        return peers.ease(train, test, k, min_rating, max_items=ease_max_items)
    raise ValueError(f"unknown peer {peer!r}; peers: {PEERS}")


def _brief(system: str, result: dict, k: int) -> str:
    if "skipped" in result:
        return f"{system} skipped"
    return f"{system} R@{k} {result[f'recall@{k}']:.4f}"


def _summary(per_split: list[dict], k: int) -> dict:
    """Means over splits; each system's ratio to the best peer (by the mean)."""
    keys = (f"recall@{k}", f"ndcg@{k}", "fit_s")
    summary: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        results = [r[system] for r in per_split if system in r]
        if not results:
            continue
        skipped = [r["skipped"] for r in results if "skipped" in r]
        if skipped:
            summary[system] = {"skipped": skipped[0]}
            continue
        summary[system] = {key: float(np.mean([r[key] for r in results])) for key in keys}
        params = [r["params"] for r in results if "params" in r]
        if params:
            summary[system]["params"] = params
    pipeline = summary["pipeline"]
    pipeline["candidate_recall"] = {
        name: float(np.mean([r["pipeline"]["candidate_recall"][name] for r in per_split]))
        for name in per_split[0]["pipeline"]["candidate_recall"]
        if all(name in r["pipeline"]["candidate_recall"] for r in per_split)
    }
    pipeline["latency_ms"] = {
        q: float(np.mean([r["pipeline"]["latency_ms"][q] for r in per_split])) for q in ("p50", "p99")
    }
    ablations = [r["ablation"] for r in per_split if "ablation" in r]
    if ablations and len(ablations) == len(per_split):
        pipeline["ablation"] = {
            variant: {key: float(np.mean([a[variant][key] for a in ablations])) for key in keys[:2]}
            for variant in ablations[0]
            if all(variant in a for a in ablations)
        }
    measured = [p for p in PEERS if p in summary and "skipped" not in summary[p]]
    if measured:
        for key in (f"recall@{k}", f"ndcg@{k}"):
            best = max(measured, key=lambda p: summary[p][key])
            pipeline[f"best_peer_{key}"] = best
            pipeline[f"ratio_to_best_peer_{key}"] = pipeline[key] / max(summary[best][key], 1e-12)
    return summary


def format_summary(report: dict) -> str:
    """The report as a table (means over the splits)."""
    k, s = report["k"], report["summary"]
    lines = [
        f"Pipeline evaluation on {report['data'] or 'the data'}, split(s) {', '.join(report['splits'])}, "
        f"{report['n_candidates']} candidates, relevance {report['min_rating']}",
        f"  {'system':<14}{f'Recall@{k}':>11}{f'NDCG@{k}':>10}{'fit s':>9}  note",
    ]
    for system in SYSTEMS:
        if system not in s:
            continue
        r = s[system]
        if "skipped" in r:
            lines.append(f"  {system:<14}{'-':>11}{'-':>10}{'-':>9}  skipped: {r['skipped']}")
            continue
        note = ""
        if "params" in r:  # the best setting of each split, with how many splits chose it
            chosen = Counter(", ".join(f"{key}={value:g}" for key, value in p.items()) for p in r["params"])
            note = "best of grid: " + "; ".join(
                f"{params} ({n} of {len(r['params'])})" if len(r["params"]) > 1 else params
                for params, n in chosen.most_common()
            )
        lines.append(f"  {system:<14}{r[f'recall@{k}']:>11.4f}{r[f'ndcg@{k}']:>10.4f}{r['fit_s']:>9.1f}  {note}")
    p = s["pipeline"]
    for key in (f"recall@{k}", f"ndcg@{k}"):
        if f"best_peer_{key}" in p:
            lines.append(
                f"  pipeline / best peer ({p[f'best_peer_{key}']}) {key}: {p[f'ratio_to_best_peer_{key}']:.3f}"
            )
    lines.append(
        f"  candidate recall@{report['n_candidates']} per source: "
        + ", ".join(f"{name} {value:.3f}" for name, value in p["candidate_recall"].items())
    )
    lines.append(f"  recommend latency: p50 {p['latency_ms']['p50']:.2f} ms, p99 {p['latency_ms']['p99']:.2f} ms")
    if "ablation" in p:
        lines.append(f"  ablation, Recall@{k} / NDCG@{k} (the pipeline above serves the ranker with every group):")
        for variant, found in p["ablation"].items():
            lines.append(f"    {variant:<24}{found[f'recall@{k}']:>9.4f}{found[f'ndcg@{k}']:>10.4f}")
    return "\n".join(lines)


def plot_summary(report: dict, path: str | Path) -> Path | None:
    """A bar chart of Recall and NDCG at k per system (means over the splits), or None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k, s = report["k"], report["summary"]
    systems = [name for name in SYSTEMS if name in s and "skipped" not in s[name]]
    x = np.arange(len(systems))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, key in ((-0.2, f"recall@{k}"), (0.2, f"ndcg@{k}")):
        ax.bar(x + offset, [s[name][key] for name in systems], width=0.4, label=key)
    ax.set_xticks(x, systems)
    ax.set_ylabel("mean over splits")
    ax.set_title(f"{report['data'] or 'data'}: {', '.join(report['splits'])}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
