"""``python -m engine`` runs the ``tandem`` command line."""

import sys

from engine.cli import main

sys.exit(main())
