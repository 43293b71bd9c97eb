"""Interactions partitioned by user on disk, so that each rank of a distributed training
run reads only its own part.

``tandem data shard PATH --parts P --out DIR`` (:func:`write_shards`) writes::

    DIR/shards.json        sizes, the part of each row count, the whole data's fingerprint
    DIR/users.npy          the user ids in dense-index order (unicode, no pickle)
    DIR/items.npy          the item ids
    DIR/part-00000.parquet user, item (dense indices), rating, timestamp of part 0's users
    ...
    DIR/features/          the item/user feature tables and titles, when the data has them

User ``u`` (dense index) is in part ``u % P``. A training run on ``N`` processes (``P`` a
multiple of ``N``) gives rank ``r`` the parts ``r, r + N, ...``: the users ``u`` with
``u % N == r``, which is the rule :mod:`engine.models.distributed` shards the user table
by. :func:`read_shards` reads those parts (or all of them) into a :class:`Dataset` with
the whole data's id maps; a part's rows are never read by another rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.data.dataset import Dataset, FeatureTable, IdMap
from engine.errors import ConfigError, DataFormatError

MANIFEST = "shards.json"
_COLUMNS = {"user": np.int32, "item": np.int32, "rating": np.float32, "timestamp": np.int64}
FORMAT = "tandem-shards"
VERSION = 1


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`write_shards`."""
    return Path(path, MANIFEST).is_file()


def part_file(directory: Path, part: int) -> Path:
    return directory / f"part-{part:05d}.parquet"


def write_shards(dataset: Dataset, directory: str | os.PathLike, parts: int) -> Path:
    """Write ``dataset`` as ``parts`` user-partitioned files in ``directory`` (created;
    it must not hold shards already). Returns the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    out = Path(directory)
    if is_sharded(out):
        raise ConfigError(f"{out} already holds shards ({MANIFEST}): choose another directory, or remove it")
    out.mkdir(parents=True, exist_ok=True)
    part_of_row = dataset.user_idx % parts
    order = np.argsort(part_of_row, kind="stable")  # part by part, in the data's order
    # The rows in the order reading every part gives: its fingerprint is the one a model
    # trained on all the parts records (engine.models.artifacts.record_trained_on).
    whole = dataset.subset(order)
    bounds = np.searchsorted(part_of_row[order], np.arange(parts + 1))
    for p in range(parts):
        rows = slice(bounds[p], bounds[p + 1])
        table = pa.table(
            {
                "user": whole.user_idx[rows],
                "item": whole.item_idx[rows],
                "rating": whole.ratings[rows],
                "timestamp": whole.timestamps[rows],
            }
        )
        pq.write_table(table, part_file(out, p))
    np.save(out / "users.npy", dataset.users.ids)
    np.save(out / "items.npy", dataset.items.ids)
    features = {
        side: _write_table(out / "features" / side, table)
        for side, table in (("user", dataset.user_features), ("item", dataset.item_features))
        if table is not None
    }
    if dataset.item_titles is not None:
        (out / "features").mkdir(exist_ok=True)
        np.save(out / "features" / "item_titles.npy", dataset.item_titles)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": dataset.name,
        "parts": parts,
        "by": "user % parts",
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_ratings": dataset.n_ratings,
        "part_ratings": np.diff(bounds).tolist(),
        "fingerprint": whole.fingerprint(),
        "features": features,
        "titles": dataset.item_titles is not None,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))  # last: a directory without it is no shard set
    return path


def read_shards(directory: str | os.PathLike, rank: int = 0, size: int = 1) -> Dataset:
    """The interactions of rank ``rank`` of ``size`` (its parts ``rank, rank + size, ...``;
    every part for ``(0, 1)``), with the whole data's id maps and features. A dataset of
    some parts records the whole in ``shard_of`` (name, fingerprint, size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(directory)
    manifest = _manifest(root)
    parts = manifest["parts"]
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    if parts % size:
        raise DataFormatError(
            root / MANIFEST,
            None,
            f"{parts} parts cannot be shared by {size} processes: write a multiple of {size} parts "
            f"(tandem data shard --parts)",
        )
    users = IdMap(_load_ids(root / "users.npy", manifest["n_users"]), "user")
    items = IdMap(_load_ids(root / "items.npy", manifest["n_items"]), "item")
    mine = list(range(rank, parts, size))
    # Each column of each part is copied into arrays of the rank's size as it is read,
    # so the peak is the rank's arrays plus one column of one part.
    n_rows = sum(manifest["part_ratings"][p] for p in mine)
    columns = {name: np.empty(n_rows, dtype) for name, dtype in _COLUMNS.items()}
    start = 0
    for p in mine:
        path = part_file(root, p)
        expected = manifest["part_ratings"][p]
        try:
            part = pq.ParquetFile(path)
            found = part.metadata.num_rows, sorted(part.schema_arrow.names)
            if found != (expected, sorted(_COLUMNS)):
                raise DataFormatError(
                    path, None, f"expected {expected} rows of {sorted(_COLUMNS)}, found {found[0]} of {found[1]}"
                )
            for name, out in columns.items():
                out[start : start + expected] = part.read(columns=[name]).column(0).to_numpy()
        except (OSError, pa.ArrowInvalid) as e:
            raise DataFormatError(path, None, f"not a readable part: {e}") from None
        if np.any(columns["user"][start : start + expected] % parts != p):
            raise DataFormatError(path, None, f"holds users of another part than {p}")
        start += expected
    pa.default_memory_pool().release_unused()
    features = manifest.get("features", {})
    dataset = Dataset(
        columns["user"],
        columns["item"],
        columns["rating"],
        columns["timestamp"],
        users,
        items,
        user_features=_read_table(root / "features" / "user", features["user"]) if "user" in features else None,
        item_features=_read_table(root / "features" / "item", features["item"]) if "item" in features else None,
        item_titles=np.load(root / "features" / "item_titles.npy", allow_pickle=False) if manifest["titles"] else None,
        name=manifest["name"] if size == 1 else f"{manifest['name']} (rank {rank} of {size})",
        drop_duplicates=False,  # a pair's rows are in its user's part, deduplicated when written
    )
    if size > 1:
        dataset.shard_of = {
            "data": manifest["name"],
            "fingerprint": manifest["fingerprint"],
            "n_ratings": manifest["n_ratings"],
        }
    return dataset


def _manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataFormatError(path, None, f"not a readable shard manifest: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataFormatError(path, None, f"not a {FORMAT} manifest of version {VERSION}")
    return manifest


def _load_ids(path: Path, expected: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(path, None, f"not a readable id array: {e}") from None
    if ids.shape != (expected,):
        raise DataFormatError(path, None, f"expected {expected} ids, found shape {ids.shape}")
    return ids


def _write_table(directory: Path, table: FeatureTable) -> dict:
    """A feature table as one ``.npy`` per column; returns its manifest entry."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(table.columns)
    for k, name in enumerate(names):
        np.save(directory / f"{k}.npy", table.columns[name])
    return {"columns": names, "labels": table.labels}


def _read_table(directory: Path, entry: dict) -> FeatureTable:
    return FeatureTable(
        {name: np.load(directory / f"{k}.npy", allow_pickle=False) for k, name in enumerate(entry["columns"])},
        {name: list(labels) for name, labels in entry["labels"].items()},
    )
