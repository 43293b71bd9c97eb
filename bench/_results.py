"""Where every benchmark writes its JSON result: ``bench/results/<name>.json``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, result) -> Path:
    """Write ``result`` as indented JSON to ``bench/results/<name>.json``; return the path."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    return out
