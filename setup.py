"""Build hook: generate the gRPC code of protos/ into engine/service/rpc/ at install.

The generated modules are build outputs, not source: they are not committed. Every
install (``pip install .``, ``pip install -e .``, a wheel) runs ``build_py``, which
runs ``protos/generate.py`` first with the grpcio-tools of ``[build-system].requires``
(pinned, so every install generates the same code). Everything else is in
pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_grpc(build_py):
    def run(self):
        spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
        generate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generate)
        generate.write(generate.generate())
        super().run()


setup(cmdclass={"build_py": build_py_with_grpc})
