"""``python -m index_builder`` = ``tandem build-index``: build and publish a bundle."""

import sys

from engine.cli import main

sys.exit(main(["build-index", *sys.argv[1:]]))
