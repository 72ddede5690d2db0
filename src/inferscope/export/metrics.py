"""Compatibility module: the names ``inferscope.export.metrics`` used to define, re-exported.

The code lives in three modules now; import from them:

- ``export/points.py``: the metric names (``INFERENCE_DURATION``, ``STAGE_DURATION``,
  ``RECORDS_DROPPED``...), :func:`series_counters`, :class:`PointBuilder` and
  :func:`signal_metrics`, what turns an ``AggregateView`` into OTel ``Metric`` objects;
- ``export/sdk.py``: the OTel SDK side, :class:`AggregatesExporter`,
  :func:`export_empty_collections`, :func:`wrap_meter_provider` and :func:`unwrap_meter_provider`
  (with the reader registry and its fork hook);
- ``export/prometheus.py``: :class:`PrometheusCollector`, :func:`start_prometheus_server`,
  :class:`PrometheusServer`, :func:`target_info` and :func:`prometheus_label_name`.
"""

from __future__ import annotations

from .points import (
    _HISTOGRAMS,
    AGGREGATIONS,
    DROP_REASON,
    EXPORTS_FAILED,
    INFERENCE_ABANDONED,
    INFERENCE_CPU_TIME,
    INFERENCE_DURATION,
    KEYS_OVERFLOWED,
    RECORDS_DROPPED,
    SCOPE_NAME,
    SDK_ERRORS,
    SPANS_DROPPED,
    STAGE_CPU_TIME,
    STAGE_DURATION,
    STAGE_GPU_TIME,
    PointBuilder,
    _provided_signals,
    _scope_version,
    series_counters,
    signal_metrics,
)
from .prometheus import (
    METRICS_PATHS,
    PrometheusCollector,
    PrometheusServer,
    prometheus_label_name,
    start_prometheus_server,
    target_info,
)
from .sdk import (
    AggregatesExporter,
    _CollectWithAggregates,
    export_empty_collections,
    unwrap_meter_provider,
    wrap_meter_provider,
)

__all__ = [
    "AGGREGATIONS",
    "DROP_REASON",
    "EXPORTS_FAILED",
    "INFERENCE_ABANDONED",
    "INFERENCE_CPU_TIME",
    "INFERENCE_DURATION",
    "KEYS_OVERFLOWED",
    "METRICS_PATHS",
    "RECORDS_DROPPED",
    "SCOPE_NAME",
    "SDK_ERRORS",
    "SPANS_DROPPED",
    "STAGE_CPU_TIME",
    "STAGE_DURATION",
    "STAGE_GPU_TIME",
    "_HISTOGRAMS",
    "AggregatesExporter",
    "PointBuilder",
    "PrometheusCollector",
    "PrometheusServer",
    "_CollectWithAggregates",
    "_provided_signals",
    "_scope_version",
    "export_empty_collections",
    "prometheus_label_name",
    "series_counters",
    "signal_metrics",
    "start_prometheus_server",
    "target_info",
    "unwrap_meter_provider",
    "wrap_meter_provider",
]
