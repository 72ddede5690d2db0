"""The names of the former ``inferscope.aggregate`` module, which now lives in three modules:

- :mod:`inferscope.histogram`: the exponential-histogram bucket math (:data:`SCALE`,
  :data:`MIN_SCALE`, :func:`bucket_indices`) and :class:`Histogram`;
- :mod:`inferscope.aggregator`: :class:`Series`, :class:`AggregateView` and :class:`Aggregator`,
  which folds ring records into per-series histograms;
- :mod:`inferscope.snapshots`: :class:`StatsRow`, :class:`Snapshot` and :func:`build_snapshot`, the
  types of ``inferscope.snapshot()``.

This module only re-exports them, so that code importing ``inferscope.aggregate`` keeps working;
new code imports from the modules above.
"""

from __future__ import annotations

from .aggregator import AggregateView, Aggregator, Series
from .histogram import MIN_SCALE, SCALE, Histogram, bucket_indices
from .snapshots import TABLE_COLUMNS, Snapshot, StatsRow, build_snapshot

__all__ = [
    "MIN_SCALE",
    "SCALE",
    "TABLE_COLUMNS",
    "AggregateView",
    "Aggregator",
    "Histogram",
    "Series",
    "Snapshot",
    "StatsRow",
    "bucket_indices",
    "build_snapshot",
]
