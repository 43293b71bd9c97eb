"""Generate the Python gRPC code of protos/tandem/v1/tandem.proto into engine/service/rpc/
(``make proto``; every install runs it too, from ``setup.py``). Needs grpcio-tools
(pinned in ``[build-system].requires`` and the ``dev`` extra). The generated code is a
build output, not committed. With ``--check`` it writes nothing and fails when the
generated code is missing or older than the proto (edit the proto, then ``make proto``).

protoc writes ``from tandem.v1 import tandem_pb2``; the import is rewritten to the package
the code lives in, ``engine.service.rpc``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("tandem/v1/tandem.proto")
OUT = ROOT / "engine" / "service" / "rpc"
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(ROOT / "protos" / PROTO),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
        out = {}
        for name in GENERATED:
            text = (Path(tmp) / PROTO.parent / name).read_text()
            out[name] = text.replace("from tandem.v1 import tandem_pb2", "from engine.service.rpc import tandem_pb2")
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if engine/service/rpc/ differs from a fresh generation"
    )
    args = parser.parse_args()
    fresh = generate()
    stale = [n for n, text in fresh.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
    if args.check:
        if stale:
            print(f"stale or missing generated code in {OUT}: {stale}; run `make proto`", file=sys.stderr)
            return 1
        print(f"{OUT}: generated code is fresh")
        return 0
    write(fresh)
    print(f"generated {', '.join(GENERATED)} into {OUT}")
    return 0


def write(generated: dict[str, str]) -> None:
    """Write the generated modules into engine/service/rpc/ (unchanged files untouched)."""
    for name, text in generated.items():
        path = OUT / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
