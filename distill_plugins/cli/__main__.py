"""``python -m distill_plugins.cli``: the ``distill`` command (used by torchrun and the launchers)."""

import sys

from distill_plugins.cli.main import main

sys.exit(main())
