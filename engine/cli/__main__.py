"""``python -m engine.cli``: the ``tandem`` command."""

import sys

from engine.cli import main

sys.exit(main())
