"""Model directories on disk: one JSON file of metadata plus one ``.npz`` of plain
arrays. Nothing is pickled: arrays are read with ``allow_pickle=False``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.errors import TandemError


def write_model_dir(path: str | Path, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``<name>.json`` and ``<name>_arrays.npz`` into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / f"{name}_arrays.npz", **arrays)  # type: ignore[arg-type]  # (numpy's stub: **kwds as allow_pickle)
    (path / f"{name}.json").write_text(json.dumps(meta, indent=2))
    return path


def read_model_meta(path: str | Path, name: str, kind: str, format_version: int) -> dict:
    """A model directory's ``<name>.json``, checking ``kind`` and ``format_version``;
    errors name the offending file."""
    path = Path(path)
    meta_path = path / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise TandemError(f"{path}: not a {kind} model directory ({meta_path.name} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TandemError(f"{meta_path}: invalid JSON: {e}") from None
    if meta.get("format_version") != format_version or meta.get("kind") != kind:
        raise TandemError(
            f"{meta_path}: expected a {kind} model of format {format_version}, "
            f"found kind={meta.get('kind')!r} format={meta.get('format_version')!r}"
        )
    return meta


def read_model_dir(path: str | Path, name: str, kind: str, format_version: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a directory written by :func:`write_model_dir`, checking ``kind`` and
    ``format_version``; errors name the offending file."""
    meta = read_model_meta(path, name, kind, format_version)
    arrays_path = Path(path) / f"{name}_arrays.npz"
    try:
        with np.load(arrays_path, allow_pickle=False) as a:
            arrays = {k: a[k] for k in a.files}
    except (OSError, ValueError) as e:
        raise TandemError(f"{arrays_path}: unreadable: {e}") from None
    return meta, arrays


def record_trained_on(model, dataset) -> None:
    """Note in a model's metrics the data it was trained on (name, fingerprint, size), so
    that evaluating it on that same data is caught (``tandem eval-cf`` / ``eval-towers``)."""
    # One rank's parts of a sharded directory: the model was trained on the whole of it.
    model.metrics["trained_on"] = dataset.shard_of or {
        "data": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "n_ratings": dataset.n_ratings,
    }
