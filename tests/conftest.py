"""Shared fixtures. ML-100K tests skip visibly when the dataset is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ML100K = Path(os.environ.get("TANDEM_ML100K", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"))


@pytest.fixture
def ml100k_path() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (set TANDEM_ML100K)")
    return ML100K


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture(scope="session")
def small_models():
    """A small synthetic dataset with CF and two-tower models trained on it (seeded),
    shared by the engine and service tests: ``(dataset, cf, towers)``."""
    from engine import data
    from engine.models.cf import train_cf
    from engine.models.towers import train_two_tower

    ds = data.make_synthetic(n_users=400, n_items=300, n_ratings=12_000, seed=0)
    cf = train_cf(ds, n_features=16, epochs=15, batch_size=1024, learning_rate=0.01, lambda_=5.0, progress=False)
    towers = train_two_tower(
        ds, objective="softmax", hidden_layers=(32,), output_dim=16, epochs=3, batch_size=256, progress=False
    )
    return ds, cf, towers


@pytest.fixture(scope="session")
def titled_models(small_models):
    """:func:`small_models` with display titles on the items ("Film number 7"), as the
    web page and the HTTP face show them (a shallow copy: the shared dataset is unchanged)."""
    import copy

    import numpy as np

    ds, cf, towers = small_models
    titled = copy.copy(ds)
    titled.item_titles = np.array([f"Film number {i}" for i in range(ds.n_items)])
    return titled, cf, towers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Marks a test whose call failed (``item.failed_call``): the browser tests save a
    screenshot then."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed_call = True
