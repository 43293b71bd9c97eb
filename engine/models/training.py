"""What the CF and two-tower trainers share: seeding, devices, early stopping, progress,
and the learning curve (JSON, plus a PNG when matplotlib is installed)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import TandemError


def require_torch():
    """The ``torch`` module, or a clear error: training needs PyTorch, which is the
    ``train`` extra (serving, index building and evaluation of saved models do not)."""
    try:
        import torch
    except ModuleNotFoundError:
        raise TandemError(
            "training needs PyTorch, which is not installed: pip install 'tandem[train]' (make install does)"
        ) from None
    return torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    torch = require_torch()

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator, for libraries that still use it
    torch.manual_seed(seed)


def resolve_device(device: str | None):
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``None``/``"auto"`` (CUDA when available)."""
    torch = require_torch()

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


@dataclass
class EarlyStopping:
    """Stop when the validation metric (lower is better) has not improved by
    ``min_delta`` for ``patience`` epochs. ``best_epoch`` is 1-based."""

    patience: int = 3
    min_delta: float = 1e-4
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> tuple[bool, bool]:
        """Record one epoch; returns ``(improved, should_stop)``."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.patience


@dataclass
class LearningCurve:
    """Per-epoch records, e.g. ``{"epoch": 1, "train_loss": 0.8, "val_rmse": 0.95}``."""

    records: list[dict] = field(default_factory=list)

    def add(self, **values: float) -> None:
        self.records.append({k: float(v) if k != "epoch" else int(v) for k, v in values.items()})

    def save(self, json_path: str | Path, title: str = "learning curve") -> Path | None:
        """Write the records as JSON and, when matplotlib is installed, a PNG next to it
        (same name, ``.png``). Returns the PNG path, or ``None`` without matplotlib."""
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(self.records, indent=2))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        if not self.records:
            return None
        png = json_path.with_suffix(".png")
        epochs = [r["epoch"] for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in self.records[0]:
            if key != "epoch":
                ax.plot(epochs, [r.get(key, np.nan) for r in self.records], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png
