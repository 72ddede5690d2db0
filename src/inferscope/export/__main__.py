"""``python -m inferscope.export docs/metrics.md``: regenerate the metric tables from the specification."""

from .spec import main

raise SystemExit(main())
