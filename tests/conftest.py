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
