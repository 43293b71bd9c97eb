"""Configuration: defaults, ``tandem.toml``, and command-line overrides.

Precedence, lowest first: the defaults below, the TOML file (``--config PATH``, else
``./tandem.toml`` when it exists), then ``--set section.key=value`` flags (values are
TOML literals: ``--set cf.n_features=64``, ``--set data.source='"synthetic"'`` or
simply ``--set data.source=synthetic``), then the dedicated flags of each command.
Unknown sections or keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from engine.errors import ConfigError
from engine.settings import EngineConfig, IndexConfig, RankerConfig, ServerConfig

DEFAULT_ML100K = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "ml-100k"

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        # "auto": $TANDEM_ML100K, else ../shared/datasets/ml-100k when present, else
        # "synthetic". Or a MovieLens directory, a CSV/Parquet file, or "synthetic".
        "source": "auto",
        # Role -> column name for generic CSV/Parquet files (user, item, rating, timestamp).
        "columns": {},
        "delimiter": ",",  # field separator of a generic CSV file (.tsv files: a tab)
        # Side tables of your own attributes (CSV/Parquet keyed by id; engine.data.side_tables):
        # used by the towers, filters and cold start, and by every rebuild from this data.
        "item_features": "",
        "user_features": "",
        # Column -> kind ("numeric", "categorical", "labels", "title", "ignore") where the
        # inferred kind is not the one you mean, e.g. {"zip" = "categorical"}.
        "feature_kinds": {},
        "synthetic": {"n_users": 2000, "n_items": 1000, "n_ratings": 100_000, "seed": 0},
        # Train/test split for training and evaluation commands: "auto" (u1 for ML-100K,
        # else random), "u1".."u5", "ua", "ub", "random", "last" (leave-last-n per user),
        # "cold-items", or "none" (train on everything).
        "split": "auto",
        "test_ratio": 0.2,  # random split: share of interactions; cold-items: share of items
        "leave_last": 1,  # "last" split: interactions per user held out
        "split_seed": 0,
    },
    # Settings of engine.models.cf.CFConfig (n_features, lambda, learning_rate, epochs, ...).
    "cf": {},
    "towers": {},
    # The models trained for serving (make train, make publish, train_and_publish): the
    # retrieval presets (CF "topn", towers "retrieval") with these settings over them;
    # what `tandem tune` writes.
    "retrieval": {"cf": {}, "towers": {}},
    # The learned ranking stage (engine.models.ranker.RankerConfig): trained by make
    # train / train_and_publish on held-out interactions, stored in the bundle.
    "ranker": asdict(RankerConfig()),
    # models / bundles: where trained models and published bundles go; tuned: the
    # settings `tandem tune` wrote, merged over tandem.toml whenever the file exists.
    "paths": {"models": "artifacts/models", "bundles": "artifacts/bundles", "tuned": "artifacts/tuned.toml"},
    # Index building, serving and the service: the classes of engine.settings.
    "index": asdict(IndexConfig()),
    "engine": asdict(EngineConfig()),
    "server": {key: value for key, value in asdict(ServerConfig()).items() if key not in ServerConfig.NOT_IN_FILE},
}


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The effective configuration: defaults, then the TOML file, then ``overrides``.

    Args:
        path: a TOML file; when ``None``, ``./tandem.toml`` is read if it exists.
        overrides: ``"section.key=value"`` strings (nested keys allowed:
            ``data.synthetic.seed=3``).
    """
    config = copy.deepcopy(DEFAULTS)
    if path is None and Path("tandem.toml").is_file():
        path = "tandem.toml"
    if path is not None:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                loaded = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such configuration file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        _merge(config, loaded, origin=str(p))
    _apply_overrides(config, overrides)
    tuned = Path(config["paths"]["tuned"]) if config["paths"]["tuned"] else None
    if tuned is not None and tuned.is_file():  # tandem tune's settings; --set still wins
        try:
            with open(tuned, "rb") as f:
                _merge(config, tomllib.load(f), origin=str(tuned))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{tuned}: invalid TOML: {e}") from None
        _apply_overrides(config, overrides)
        config["paths"]["tuned_in_use"] = str(tuned)
    validate(config)
    return config


def _apply_overrides(config: dict, overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        value = _parse_value(raw.strip())
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(config, nested, origin=f"--set {item}")


def validate(config: dict[str, dict[str, Any]]) -> None:
    """Check every section against its settings class now, not when a command first
    reads it: an unknown key, a value of the wrong type or out of range is a
    :class:`ConfigError` naming the section and the key as the file spells it."""
    from engine.models.cf import PRESETS as CF_PRESETS
    from engine.models.cf import CFConfig
    from engine.models.towers import PRESETS as TOWER_PRESETS
    from engine.models.towers import TowerConfig

    for section, cls, build in (
        ("cf", CFConfig, CFConfig.from_dict),
        ("towers", TowerConfig, TowerConfig.from_dict),
        ("retrieval.cf", CFConfig, lambda values: CFConfig.from_dict({**CF_PRESETS["topn"], **values})),
        (
            "retrieval.towers",
            TowerConfig,
            lambda values: TowerConfig.from_dict({**TOWER_PRESETS["retrieval"], **values}),
        ),
        ("ranker", RankerConfig, RankerConfig.from_dict),
        ("index", IndexConfig, lambda values: IndexConfig(**values)),
        ("engine", EngineConfig, lambda values: EngineConfig(**values)),
        ("server", ServerConfig, lambda values: ServerConfig(**values)),
    ):
        values = config[section] if "." not in section else config["retrieval"][section.split(".")[1]]
        defaults = {f.name: f.default for f in fields(cls)}
        for key, value in values.items():
            default = defaults.get("lambda_" if key == "lambda" else key)
            if not _same_kind(default, value):
                raise ConfigError(
                    f"[{section}] {key} = {value!r}: expected {type(default).__name__} (like the default {default!r})"
                )
        try:
            build(dict(values))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[{section}]: {str(e).replace('lambda_', 'lambda')}") from None


def _same_kind(default: Any, value: Any) -> bool:
    """Whether a setting's value has the kind of its default (an int passes for a float;
    a default of None or a container accepts anything its class then checks)."""
    if default is None or isinstance(default, (dict, list, tuple)) or not isinstance(default, (bool, int, float, str)):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))


def _parse_value(raw: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table); bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# Sections whose keys are not fixed here: their owners validate them.
OPEN_SECTIONS = {
    "cf",
    "towers",
    "retrieval.cf",
    "retrieval.towers",
    "data.columns",
    "data.synthetic",
    "data.feature_kinds",
    "engine.source_weights",
}


def merged(config: dict[str, dict[str, Any]], sections: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    """A copy of ``config`` with ``sections`` merged in, key by key, by the rules of a
    configuration file (unknown settings refused, naming ``origin``), and checked."""
    out = copy.deepcopy(config)
    _merge(out, sections, origin)
    validate(out)
    return out


def _merge(base: dict, update: dict, origin: str, path: str = "") -> None:
    for key, value in update.items():
        dotted = f"{path}.{key}" if path else key
        if key not in base and path not in OPEN_SECTIONS:
            where = f"[{path}]" if path else "the top level"
            raise ConfigError(f"{origin}: unknown setting {dotted!r}; known in {where}: {sorted(base)}")
        if isinstance(base.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted} is a section, not a value")
            _merge(base[key], value, origin, dotted)
        else:
            base[key] = value


def resolve_data_source(source: str) -> str:
    """Turn ``"auto"`` into a concrete source: ``$TANDEM_ML100K``, the shared ML-100K
    copy when present, else ``"synthetic"``."""
    if source != "auto":
        return source
    env = os.environ.get("TANDEM_ML100K")
    if env:
        return env
    for candidate in (Path("../shared/datasets/ml-100k"), DEFAULT_ML100K):
        if (candidate / "u.data").is_file():
            return str(candidate)
    return "synthetic"


def load_dataset(config: dict[str, dict[str, Any]], source: str | None = None, shard: tuple[int, int] = (0, 1)):
    """Load the dataset the configuration (or an explicit ``source``) names: of a
    sharded directory only the parts of rank ``shard[0]`` of ``shard[1]``."""
    from engine import data

    src = resolve_data_source(source or config["data"]["source"])
    if src == "synthetic":
        try:
            dataset = data.make_synthetic(**config["data"]["synthetic"])
        except (TypeError, ValueError) as e:  # an unknown key or a value out of range in [data.synthetic]
            raise ConfigError(f"[data.synthetic]: {e}") from None
    else:
        dataset = data.load(
            src, columns=config["data"]["columns"] or None, delimiter=config["data"]["delimiter"], shard=shard
        )
    return with_configured_side_tables(config, dataset)


def with_configured_side_tables(config: dict[str, dict[str, Any]], dataset):
    """``dataset`` with the side tables of ``data.item_features`` / ``data.user_features``
    (unchanged when neither is set)."""
    from engine.data.side_tables import with_side_tables

    tables = _configured_side_tables(config, dataset)
    return dataset if tables is None else with_side_tables(dataset, *tables)


def split_with_configured_side_tables(config: dict[str, dict[str, Any]], split):
    """A :class:`~engine.data.Split` whose parts have the configured side tables: the
    parts share their id maps, so the tables are read once for both."""
    from engine.data import Split
    from engine.data.side_tables import with_side_tables

    tables = _configured_side_tables(config, split.train)
    if tables is None:
        return split
    return Split(with_side_tables(split.train, *tables), with_side_tables(split.test, *tables), split.cold_items)


def _configured_side_tables(config: dict[str, dict[str, Any]], dataset):
    """``(item table, user table)`` read for ``dataset``'s id maps (either None where
    not configured), or None when no side table is configured."""
    from engine.data.side_tables import read_side_table

    cfg = config["data"]
    if not cfg["item_features"] and not cfg["user_features"]:
        return None
    columns = cfg["columns"] or {}
    return tuple(
        read_side_table(
            cfg[f"{side}_features"],
            side,
            getattr(dataset, f"{side}s"),
            columns.get(side),
            cfg["feature_kinds"],
            cfg["delimiter"],
        )
        if cfg[f"{side}_features"]
        else None
        for side in ("item", "user")
    )


def load_split(config: dict[str, dict[str, Any]], source: str | None = None, split: str | None = None):
    """The train/test :class:`~engine.data.Split` the configuration names, or ``None``
    for split ``"none"`` (then the caller trains on the whole dataset)."""
    from engine import data

    cfg = config["data"]
    src = resolve_data_source(source or cfg["source"])
    spec = split or cfg["split"]
    is_ml100k = src != "synthetic" and Path(src, "u1.base").is_file()
    if spec == "auto":
        spec = "u1" if is_ml100k else "random"
    if spec == "none":
        return None
    if spec in ("u1", "u2", "u3", "u4", "u5", "ua", "ub"):
        if not is_ml100k:
            raise ConfigError(f"split {spec!r} needs an ML-100K directory with {spec}.base; data is {src!r}")
        return split_with_configured_side_tables(config, data.predefined_split(src, spec[1:]))
    dataset = load_dataset(config, src)
    if spec == "random":
        return data.random_split(dataset, cfg["test_ratio"], seed=cfg["split_seed"])
    if spec == "temporal":
        return data.temporal_split(dataset, cfg["test_ratio"])
    if spec == "last":
        return data.leave_last_n(dataset, cfg["leave_last"])
    if spec == "cold-items":
        return data.item_cold_start_split(dataset, cfg["test_ratio"], seed=cfg["split_seed"])
    raise ConfigError(f"unknown split {spec!r}: use auto, u1..u5, ua, ub, random, temporal, last, cold-items or none")
