"""Data layer: the :class:`Dataset`, loaders, the synthetic generator and splits.

Typical use::

    from engine import data
    ds = data.load("../shared/datasets/ml-100k")          # auto-detects the flavour
    train, test = data.predefined_split("../shared/datasets/ml-100k", fold=1)
    synth = data.make_synthetic(n_users=5_000, n_items=2_000, n_ratings=200_000, seed=0)
    print(ds.describe())
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.data.dataset import Dataset, FeatureTable, IdMap, factorize, from_arrays
from engine.data.movielens import detect_flavour, load_ml1m, load_ml100k, load_movielens_csv
from engine.data.shards import is_sharded, read_shards, write_shards
from engine.data.splits import (
    Split,
    item_cold_start_split,
    leave_last_n,
    predefined_split,
    random_split,
    temporal_split,
)
from engine.data.synthetic import make_synthetic
from engine.data.tabular import load_table
from engine.errors import DataFormatError

__all__ = [
    "Dataset",
    "FeatureTable",
    "IdMap",
    "Split",
    "DataFormatError",
    "from_arrays",
    "factorize",
    "load",
    "load_table",
    "load_ml100k",
    "load_ml1m",
    "load_movielens_csv",
    "detect_flavour",
    "make_synthetic",
    "predefined_split",
    "random_split",
    "temporal_split",
    "leave_last_n",
    "item_cold_start_split",
    "read_shards",
    "write_shards",
]


def load(
    path: str | os.PathLike,
    columns: dict[str, str] | None = None,
    delimiter: str = ",",
    shard: tuple[int, int] = (0, 1),
) -> Dataset:
    """Load a dataset from a path.

    A directory written by ``tandem data shard`` is read as its parts, only those of rank
    ``shard[0]`` of ``shard[1]`` (:func:`read_shards`; every part by default); another
    directory is read as MovieLens, its flavour auto-detected (100K, 1M, or the
    ``ratings.csv`` family); a file is read as a generic CSV or Parquet interaction
    table, with ``columns`` mapping roles to column names and ``delimiter`` separating
    the fields of a CSV (see :func:`load_table`). ``shard`` reads less only from a
    sharded directory: other data is read whole.
    """
    p = Path(path)
    if is_sharded(p):
        return read_shards(p, *shard)
    if p.is_dir():
        flavour = detect_flavour(p)
        loader = {"ml-100k": load_ml100k, "ml-1m": load_ml1m, "ml-csv": load_movielens_csv}[flavour]
        return loader(p)
    if p.is_file():
        return load_table(p, columns=columns, delimiter=delimiter)
    raise DataFormatError(p, None, "no such file or directory")
