"""``python -m inferscope.cli``: the same as the ``inferscope`` command."""

import sys

from . import main

sys.exit(main())
