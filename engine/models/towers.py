"""The content-based two-tower model (``mission.md``), with cold start.

A user feature vector and an item feature vector (:mod:`engine.models.features`) pass through
two separate MLPs — by default Dense 256 ReLU -> Dense 128 ReLU -> Dense 32, output
L2-normalised — and the score is the dot product ``v_u . v_m``. Two objectives:

- ``mse`` (the mission's): the dot product regresses the rating scaled to [-1, 1];
- ``softmax``: in-batch sampled softmax over the batch's items with the log-q
  popularity correction (each logit minus the log of its item's sampling probability,
  so popular items are not over-penalised as negatives) and accidental hits masked.

Users and items never seen in training are embedded from their features alone, through
the same methods. Serving runs the towers in NumPy on exported weights
(:class:`NumpyTower`): for one request that is several times faster than torch, and the
tests check that both give the same vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.data import Dataset, FeatureTable, IdMap
from engine.errors import TandemError
from engine.models import distributed
from engine.models.artifacts import read_model_dir, write_model_dir
from engine.models.features import FeaturePipeline, fit_item_pipeline, fit_user_pipeline
from engine.models.training import EarlyStopping, LearningCurve, require_torch, resolve_device, seed_everything
from engine.settings import from_known_settings
from engine.topk import top_k_rows

FORMAT_VERSION = 1


# Named settings for `tandem train-towers --preset`: "rating" is TowerConfig's defaults;
# "retrieval" is what serving trains (make train, make publish, train_and_publish): the
# in-batch softmax, three epochs under a one-cycle learning-rate schedule (four were as
# good as 25 constant-rate epochs on ML-100K and synthetic implicit data; three give the
# pipeline the same Recall/NDCG@10 as four within 1% on ML-100K u1-u5 and two synthetic
# shapes, 1k and 10k items, in three quarters of the time).
PRESETS: dict[str, dict] = {
    "rating": {},
    "retrieval": {"objective": "softmax", "epochs": 3, "schedule": "onecycle"},
}


@dataclass
class TowerConfig:
    """Training settings of :func:`train_two_tower` (the ``[towers]`` section of tandem.toml)."""

    hidden_layers: tuple[int, ...] = (256, 128)
    output_dim: int = 32
    objective: str = "mse"  # "mse" (ratings scaled to [-1, 1]) or "softmax" (retrieval)
    learning_rate: float = 0.01
    epochs: int = 30
    batch_size: int = 1024
    # "constant", or "onecycle": the learning rate warms up to learning_rate and anneals
    # to ~0 over the planned epochs (few epochs reach what many constant ones do).
    schedule: str = "constant"
    temperature: float = 0.05  # softmax: logits are cosine / temperature
    logq_correction: bool = True  # softmax: subtract log item sampling probability
    weight_decay: float = 0.0
    # Share of training rows whose item rating-history features (average, count) are
    # zeroed, as they are for a new item: teaches the item tower to embed from content
    # alone, which cold-start items need (B3).
    item_history_dropout: float = 0.3
    validation_fraction: float = 0.05
    patience: int = 3
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        self.hidden_layers = tuple(int(h) for h in self.hidden_layers)
        if self.objective not in ("mse", "softmax"):
            raise ValueError(f"objective must be 'mse' or 'softmax', got {self.objective!r}")
        if self.schedule not in ("constant", "onecycle"):
            raise ValueError(f"schedule must be 'constant' or 'onecycle', got {self.schedule!r}")
        if any(h < 1 for h in self.hidden_layers) or self.output_dim < 1:
            raise ValueError("layer sizes must be positive")
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or self.temperature <= 0:
            raise ValueError("learning_rate and temperature must be positive")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.item_history_dropout <= 1.0:
            raise ValueError(f"item_history_dropout must be in [0, 1], got {self.item_history_dropout}")

    @classmethod
    def from_dict(cls, values: dict) -> TowerConfig:
        return from_known_settings(cls, values, "tower")


class NumpyTower:
    """An MLP tower on exported weights: ReLU between layers, L2-normalised output.

    ``weights[k]`` is ``[in, out]`` and ``biases[k]`` is ``[out]``.
    """

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray]):
        self.weights = [np.ascontiguousarray(w, np.float32) for w in weights]
        self.biases = [np.ascontiguousarray(b, np.float32) for b in biases]

    @property
    def input_dim(self) -> int:
        return self.weights[0].shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``[n, input_dim]`` features -> ``[n, output_dim]`` unit vectors."""
        h = np.asarray(x, np.float32)
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if k < last:
                np.maximum(h, 0, out=h)
        norm = np.sqrt(np.einsum("nd,nd->n", h, h))[:, None]
        return h / np.maximum(norm, 1e-12)


def _torch_tower(input_dim: int, hidden: tuple[int, ...], output_dim: int):
    import torch

    layers: list = []
    width = input_dim
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, output_dim))
    return torch.nn.Sequential(*layers)


def _export(module) -> NumpyTower:
    import torch

    linear = [m for m in module if isinstance(m, torch.nn.Linear)]
    return NumpyTower(
        [m.weight.detach().cpu().numpy().T for m in linear], [m.bias.detach().cpu().numpy() for m in linear]
    )


def _forward(module, x):
    import torch

    return torch.nn.functional.normalize(module(x), dim=1, eps=1e-12)


class TwoTowerModel:
    """A trained two-tower model. Embeddings are ``[n, output_dim]`` unit vectors; the
    score of a (user, item) pair is their dot product."""

    def __init__(
        self,
        user_tower: NumpyTower,
        item_tower: NumpyTower,
        user_pipeline: FeaturePipeline,
        item_pipeline: FeaturePipeline,
        users: IdMap,
        items: IdMap,
        rating_range: tuple[float, float],
        config: TowerConfig,
        item_log_popularity: np.ndarray,
        metrics: dict | None = None,
    ):
        self.user_tower, self.item_tower = user_tower, item_tower
        self.user_pipeline, self.item_pipeline = user_pipeline, item_pipeline
        self.users, self.items = users, items
        self.rating_range = (float(rating_range[0]), float(rating_range[1]))
        self.config = config
        self.item_log_popularity = np.asarray(item_log_popularity, np.float32)  # [n_items] log q
        self.metrics = metrics or {}
        self._user_table: FeatureTable | None = None  # raw feature tables of known entities, set by train/load
        self._item_table: FeatureTable | None = None
        self.torch_towers: tuple | None = None  # the trained torch modules, kept by train_two_tower
        self.item_vectors = np.zeros((0, config.output_dim), np.float32)
        self._content_vectors: np.ndarray | None = None  # content_item_vectors, once asked for

    def raw_user_features(self, user_index: int) -> dict:
        """A known user's raw features, as a new user's request would give them (the
        feature dict :meth:`user_embeddings` takes); empty when the data has none."""
        table = self._user_table
        out: dict = {}
        for encoder in self.user_pipeline.encoders:
            if table is None or encoder.name not in table.columns:
                continue
            value = table.columns[encoder.name][user_index]
            if encoder.kind == "multihot":
                out[encoder.name] = [float(v) for v in np.asarray(value).tolist()]
            elif encoder.kind == "numeric":
                if np.isfinite(value):
                    out[encoder.name] = float(value)
            elif str(value):
                out[encoder.name] = str(value)
        return out

    def _set_tables(self, user_table, item_table) -> None:
        self._user_table, self._item_table = user_table, item_table
        self._content_vectors = None  # (of the previous tables)
        self.item_vectors = self.item_tower(self.item_pipeline.transform_table(item_table, np.arange(len(self.items))))

    # -------------------------------------------------------- embeddings
    def user_features(self, users: Sequence[object] | Sequence[Mapping]) -> np.ndarray:
        """Encoded user features ``[n, d]`` from external ids or raw feature dicts."""
        return self._features(users, self.users, self.user_pipeline, self._user_table)

    def item_features(self, items: Sequence[object] | Sequence[Mapping]) -> np.ndarray:
        """Encoded item features ``[n, d]`` from external ids or raw feature dicts."""
        return self._features(items, self.items, self.item_pipeline, self._item_table)

    @staticmethod
    def _features(entities, id_map: IdMap, pipeline: FeaturePipeline, table) -> np.ndarray:
        entities = list(entities)
        if entities and all(isinstance(e, Mapping) for e in entities):
            return pipeline.transform_dicts(entities)
        if any(isinstance(e, Mapping) for e in entities):
            raise ValueError("pass either external ids or feature dicts, not a mix")
        return pipeline.transform_table(table, id_map.indices(entities))

    def user_embeddings(self, users: Sequence[object] | Sequence[Mapping]) -> np.ndarray:
        """``[n, output_dim]`` user vectors from external ids (known users, with their
        training history) or raw feature dicts such as ``{"age": 30, "gender": "F"}``
        (new users: features alone)."""
        return self.user_tower(self.user_features(users))

    def content_item_vectors(self, batch: int = 8192) -> np.ndarray:
        """``[n_items, output_dim]`` the known items' vectors from their content alone
        (their rating history zeroed): how the item tower sees each as if it were new,
        so comparable with a new item's vector (:meth:`item_embeddings` of a feature
        dict). Computed once, ``batch`` items at a time."""
        if self._content_vectors is None:
            n_history = len(self.item_pipeline.history_names)
            parts = []
            for start in range(0, len(self.items), batch):
                rows = np.arange(start, min(start + batch, len(self.items)))
                features = self.item_pipeline.transform_table(self._item_table, rows)
                features[:, features.shape[1] - n_history :] = 0.0
                parts.append(self.item_tower(features))
            self._content_vectors = np.concatenate(parts or [self.item_vectors[:0]]).astype(np.float32)
        return self._content_vectors

    def item_embeddings(self, items: Sequence[object] | Sequence[Mapping]) -> np.ndarray:
        """``[n, output_dim]`` item vectors from external ids or raw feature dicts
        (``{"genres": [...multi-hot...], "year": 1995}``) for new items."""
        if items and not isinstance(items[0], Mapping):
            return self.item_vectors[self.items.indices(items)]
        return self.item_tower(self.item_features(items))

    # ------------------------------------------------ EmbeddingModel
    name = "towers"
    embeds_from_features = True

    def retrieval_item_vectors(self) -> np.ndarray:
        return self.item_vectors

    def retrieval_user_vectors(self, user_indices: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Known users' tower vectors, ``batch`` users at a time (so that the feature
        matrices stay small)."""
        user_indices = np.asarray(user_indices, np.int64)
        parts = [self.user_vectors_at(user_indices[s : s + batch]) for s in range(0, len(user_indices), batch)]
        return np.concatenate(parts or [np.zeros((0, self.item_vectors.shape[1]))]).astype(np.float32)

    def user_biases(self, user_indices: np.ndarray) -> np.ndarray:
        return np.zeros(len(user_indices), np.float32)

    def cold_user_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        return self.user_embeddings([dict(f) for f in features])

    def cold_item_vectors(self, features: Sequence[Mapping]) -> np.ndarray:
        return self.item_embeddings([dict(f) for f in features])

    # -------------------------------------------------------- prediction
    def scores(self, user_vectors: np.ndarray, item_indices: np.ndarray | None = None) -> np.ndarray:
        """Dot products ``[n_users, n_items]`` of user vectors with known items (all, or
        ``item_indices``)."""
        items = self.item_vectors if item_indices is None else self.item_vectors[item_indices]
        return user_vectors @ items.T

    def predict_ratings(self, user_ids: Sequence[object], item_ids: Sequence[object]) -> np.ndarray:
        """Predicted ratings ``[n]`` on the original scale (``mse`` objective only)."""
        if self.config.objective != "mse":
            raise ValueError("predict_ratings needs a model trained with objective='mse'")
        if len(user_ids) != len(item_ids):
            raise ValueError(f"user_ids and item_ids differ in length: {len(user_ids)} vs {len(item_ids)}")
        dot = np.einsum("nd,nd->n", self.user_embeddings(user_ids), self.item_embeddings(item_ids))
        return self.unscale(dot)

    def user_vectors_at(self, user_indices: np.ndarray) -> np.ndarray:
        """``[n, output_dim]`` vectors of known users by dense index."""
        return self.user_tower(self.user_pipeline.transform_table(self._user_table, user_indices))

    def known_user_vectors(self) -> np.ndarray:
        """``[n_users, output_dim]`` float32 vectors of every known user."""
        return self.retrieval_user_vectors(np.arange(len(self.users)))

    def predict_rating_indices(self, user_indices: np.ndarray, item_indices: np.ndarray) -> np.ndarray:
        """Predicted ratings ``[n]`` for dense index pairs (``mse`` objective)."""
        if self.config.objective != "mse":
            raise ValueError("predicted ratings need a model trained with objective='mse'")
        dot = np.einsum("nd,nd->n", self.user_vectors_at(user_indices), self.item_vectors[item_indices])
        return self.unscale(dot)

    def unscale(self, dot: np.ndarray) -> np.ndarray:
        """Map a dot product in [-1, 1] back to the training rating range."""
        lo, hi = self.rating_range
        return np.clip((dot + 1) / 2 * (hi - lo) + lo, lo, hi).astype(np.float32)

    def recommend_indices(self, user_indices: np.ndarray, k: int, exclude) -> np.ndarray:
        """Top ``k`` item indices ``[n, k]`` for known users by exact dot product,
        excluding the items of CSR ``exclude`` ``[n_users, n_items]`` (``-1`` pads)."""
        user_indices = np.asarray(user_indices, np.int64)
        vectors = self.user_vectors_at(user_indices)
        out = np.full((len(user_indices), k), -1, np.int64)
        for start in range(0, len(user_indices), 1024):
            block = user_indices[start : start + 1024]
            out[start : start + len(block)] = top_k_rows(self.scores(vectors[start : start + 1024]), k, exclude, block)
        return out

    # ------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``towers.json`` and ``towers_arrays.npz`` (plain arrays, no pickle)."""
        arrays = {
            "user_ids": self.users.ids,
            "item_ids": self.items.ids,
            "user_history": self.user_pipeline.history,
            "item_history": self.item_pipeline.history,
            "item_log_popularity": self.item_log_popularity,
        }
        for side, tower in (("user", self.user_tower), ("item", self.item_tower)):
            for k, (w, b) in enumerate(zip(tower.weights, tower.biases)):
                arrays[f"{side}_w{k}"], arrays[f"{side}_b{k}"] = w, b
        tables = {}
        for side, table in (("user", self._user_table), ("item", self._item_table)):
            names = []
            columns: dict[str, np.ndarray] = table.columns if table is not None else {}
            for name, col in columns.items():
                arrays[f"{side}_col_{name}"] = col
                names.append(name)
            tables[side] = {"columns": names, "labels": table.labels if table is not None else {}}
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "two_tower",
            "config": asdict(self.config),
            "rating_range": list(self.rating_range),
            "n_layers": len(self.user_tower.weights),
            "user_pipeline": self.user_pipeline.to_json(),
            "item_pipeline": self.item_pipeline.to_json(),
            "tables": tables,
            "metrics": self.metrics,
        }
        return write_model_dir(path, "towers", meta, arrays)

    @classmethod
    def load(cls, path: str | Path) -> TwoTowerModel:
        """Read a model written by :meth:`save`, checking its format and dimensions."""
        from engine.data import FeatureTable

        path = Path(path)
        meta, arrays = read_model_dir(path, "towers", "two_tower", FORMAT_VERSION)
        towers = {}
        for side in ("user", "item"):
            n = meta["n_layers"]
            towers[side] = NumpyTower(
                [arrays[f"{side}_w{k}"] for k in range(n)], [arrays[f"{side}_b{k}"] for k in range(n)]
            )
        user_p = FeaturePipeline.from_json(meta["user_pipeline"], arrays["user_history"])
        item_p = FeaturePipeline.from_json(meta["item_pipeline"], arrays["item_history"])
        for side, p in (("user", user_p), ("item", item_p)):
            if towers[side].input_dim != p.dim:
                raise TandemError(
                    f"{path / 'towers_arrays.npz'}: {side} tower expects {towers[side].input_dim} "
                    f"features, the pipeline makes {p.dim}"
                )
        tables = {}
        for side in ("user", "item"):
            spec = meta["tables"][side]
            tables[side] = (
                FeatureTable({n: arrays[f"{side}_col_{n}"] for n in spec["columns"]}, spec["labels"])
                if spec["columns"]
                else None
            )
        config = TowerConfig(**meta["config"])
        model = cls(
            towers["user"],
            towers["item"],
            user_p,
            item_p,
            IdMap(arrays["user_ids"], "user"),
            IdMap(arrays["item_ids"], "item"),
            tuple(meta["rating_range"]),
            config,
            arrays["item_log_popularity"],
            meta.get("metrics"),
        )
        model._set_tables(tables["user"], tables["item"])
        return model


def train_two_tower(
    dataset: Dataset, config: TowerConfig | None = None, curve_path: str | Path | None = None, **overrides
) -> TwoTowerModel:
    """Train both towers on ``dataset``'s interactions (its features and ratings).

    Feature pipelines are fitted on ``dataset`` only. Keyword ``overrides`` replace
    fields of ``config`` (``train_two_tower(ds, objective="softmax")``).
    """
    torch = require_torch()
    from tqdm.auto import tqdm

    from engine.models.adam import Adam, one_cycle

    cfg = TowerConfig(**{**asdict(config or TowerConfig()), **overrides})
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    # One rank of N (torchrun, engine.models.distributed): this rank's users'
    # interactions (all of the data, or only the rank's parts of a sharded directory);
    # the feature pipelines and every statistic are the whole data's, sums over the
    # ranks. On one process every "rank's" quantity below is the whole's.
    rank, size = distributed.world()
    dataset = distributed.own_users(dataset)
    if distributed.total(dataset.n_ratings) == 0:
        raise ValueError("cannot train on a dataset with no interactions")
    rng = np.random.default_rng(cfg.seed if size == 1 else [cfg.seed, rank])

    user_p, item_p = fit_user_pipeline(dataset), fit_item_pipeline(dataset)
    xu = torch.as_tensor(user_p.transform_table(dataset.user_features, np.arange(dataset.n_users)), device=device)
    xi = torch.as_tensor(item_p.transform_table(dataset.item_features, np.arange(dataset.n_items)), device=device)
    lo, hi = distributed.value_range(dataset.ratings)
    scaled = (2 * (dataset.ratings - lo) / max(hi - lo, 1e-9) - 1).astype(np.float32)
    counts = distributed.total_array(dataset.item_counts())
    log_q = np.log(np.maximum(counts, 1) / counts.sum()).astype(np.float32)

    n_val = int(round(dataset.n_ratings * cfg.validation_fraction))
    perm = rng.permutation(dataset.n_ratings)
    val_rows, fit_rows = perm[:n_val], perm[n_val:]
    U = torch.as_tensor(dataset.user_idx.astype(np.int64), device=device)
    I = torch.as_tensor(dataset.item_idx.astype(np.int64), device=device)
    Y = torch.as_tensor(scaled, device=device)
    LQ = torch.as_tensor(log_q, device=device)

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    user_net = _torch_tower(xu.shape[1], cfg.hidden_layers, cfg.output_dim).to(device)
    item_net = _torch_tower(xi.shape[1], cfg.hidden_layers, cfg.output_dim).to(device)
    parameters = list(user_net.parameters()) + list(item_net.parameters())
    optimizer = Adam(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    n_item_history = len(item_p.history_names)
    # One rank of N: the replicas start from rank 0's weights; training's backward passes
    # average their gradients over the ranks (validation uses the towers directly).
    user_model, item_model = distributed.data_parallel(user_net), distributed.data_parallel(item_net)

    def loss_on(rows, training: bool = False):
        u, i = U[rows], I[rows]
        # Each tower runs once per distinct input of the batch (a user; an item, with or
        # without its history dropped), and the rows take their copy: the same vectors and
        # gradients as one pass per row, with about half the rows on ML-100K's batches.
        users, user_row = torch.unique(u, return_inverse=True)
        drop = torch.zeros_like(i)
        if training and cfg.item_history_dropout > 0:
            drop = (torch.rand(len(i), generator=gen) < cfg.item_history_dropout).to(device).long()
        item_keys, item_row = torch.unique(i * 2 + drop, return_inverse=True)
        item_x = xi[item_keys // 2]
        item_x[item_keys % 2 == 1, -n_item_history:] = 0.0
        # (index_select, not indexing: on CPU the backward of indexing adds the rows'
        # gradients with atomic adds in thread order, so two trainings with the same seed
        # drifted apart, item vectors 7-20% after 3 epochs on ML-100K; index_select's
        # backward, index_add_, adds them in order.)
        vu = _forward(user_model if training else user_net, xu[users]).index_select(0, user_row)
        vi = _forward(item_model if training else item_net, item_x).index_select(0, item_row)
        if cfg.objective == "mse":
            return torch.nn.functional.mse_loss((vu * vi).sum(1), Y[rows])
        logits = vu @ vi.T / cfg.temperature
        if cfg.logq_correction:
            logits = logits - LQ[i][None, :]
        # The same item elsewhere in the batch is not a negative for this row.
        same = (i[:, None] == i[None, :]) & ~torch.eye(len(i), dtype=torch.bool, device=device)
        logits = logits.masked_fill(same, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(i), device=device))

    # The ranks take the same number of steps per epoch, each covering its rows once, in
    # batches that together make one of about batch_size rows. (A row's in-batch
    # negatives are its rank's batch.)
    bounds, step_rows = distributed.epoch_steps(len(fit_rows), cfg.batch_size)
    steps = len(step_rows)
    smallest_batch = distributed.total_array(np.array([min(np.diff(bounds), default=0)]), "min")[0]
    if size > 1 and smallest_batch == 0:  # (every rank sees the same minimum: all raise)
        raise ValueError(f"too few interactions for {size} processes: a rank has fewer than {steps} to train on")
    fit_t = torch.as_tensor(fit_rows, device=device)
    val_batches = [
        torch.as_tensor(val_rows[s : s + cfg.batch_size], device=device) for s in range(0, n_val, cfg.batch_size)
    ]
    n_val_total = distributed.total(n_val)
    val_name = "val_mse" if cfg.objective == "mse" else "val_softmax_loss"
    curve, stopper = LearningCurve(), EarlyStopping(patience=cfg.patience)
    best = None
    # A one-cycle schedule needs a few steps to warm up and anneal; tiny data trains flat.
    one_cycle_steps = cfg.epochs * steps if cfg.schedule == "onecycle" and cfg.epochs * steps >= 10 else 0
    steps_taken = 0
    bar = tqdm(
        total=cfg.epochs * steps,
        desc=f"train towers ({cfg.objective})",
        unit="batch",
        disable=not (cfg.progress and rank == 0),
        mininterval=0.5,
    )
    for epoch in range(1, cfg.epochs + 1):
        user_net.train(), item_net.train()
        order = fit_t[torch.randperm(len(fit_rows), generator=gen).to(device)]
        running, seen = 0.0, 0
        for s in range(steps):
            rows = order[bounds[s] : bounds[s + 1]]
            if cfg.objective == "softmax" and len(rows) < 2 and size == 1:
                continue  # (on N ranks every rank steps: a row alone has a zero softmax loss)
            if one_cycle_steps:
                optimizer.lr, beta1 = one_cycle(steps_taken, one_cycle_steps, cfg.learning_rate, pct_start=0.25)
                optimizer.betas = (beta1, optimizer.betas[1])
            loss = loss_on(rows, training=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps_taken += 1
            running += float(loss.detach()) * len(rows)
            seen += len(rows)
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{running / max(seen, 1):.4f}")
        record = {"epoch": epoch, "train_loss": distributed.total(running) / max(distributed.total(seen), 1)}
        if n_val_total:
            with torch.no_grad():  # the mean of the batches' losses, over every rank's
                losses = [float(loss_on(b)) for b in val_batches if len(b) > 1]
                val = distributed.total(sum(losses)) / max(distributed.total(len(losses)), 1)
            record[val_name] = val
            improved, stop = stopper.step(val, epoch)
            if improved:
                best = (
                    [p.detach().clone() for p in user_net.state_dict().values()],
                    [p.detach().clone() for p in item_net.state_dict().values()],
                )
        curve.add(**record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
        if n_val_total and stop:
            break
    bar.close()
    if best is not None:
        for net, state in ((user_net, best[0]), (item_net, best[1])):
            net.load_state_dict(dict(zip(net.state_dict().keys(), state)))
    if curve_path is not None and rank == 0:
        curve.save(curve_path, title=f"two towers ({cfg.objective})")
    model = TwoTowerModel(
        _export(user_net),
        _export(item_net),
        user_p,
        item_p,
        dataset.users,
        dataset.items,
        (lo, hi),
        cfg,
        log_q,
        metrics={
            "best_epoch": stopper.best_epoch,
            val_name: stopper.best if n_val_total else None,
            "epochs_run": len(curve.records),
            "learning_curve": curve.records,
        },
    )
    model._set_tables(dataset.user_features, dataset.item_features)
    # Keep the torch modules for callers who want them (tests compare both paths).
    model.torch_towers = (user_net.eval(), item_net.eval())
    return model
