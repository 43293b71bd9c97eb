"""The gRPC code in engine/service/rpc (generated at install, not committed) is what
`make proto` generates from protos/ now."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the code")
    run = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_every_rpc_and_field_is_commented():
    lines = (ROOT / "protos" / "tandem" / "v1" / "tandem.proto").read_text().splitlines()
    for n, line in enumerate(lines):
        text = line.strip()
        if text.startswith("rpc ") or (text.endswith(";") and "=" in text and not text.startswith("//")):
            above = lines[n - 1].strip()
            # A field or rpc needs a comment of its own, or belongs to a commented group
            # (consecutive fields documented once above the group).
            assert above.startswith("//") or (above.endswith(";") and "=" in above) or above.startswith("oneof"), (
                f"tandem.proto line {n + 1} has no comment: {text}"
            )
