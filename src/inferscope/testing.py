"""Helpers for testing code that is instrumented with inferscope.

:class:`InMemoryMetricExporter` keeps every batch the SDK exports, so a test can read back what
inferscope would have sent to a backend::

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from inferscope.testing import InMemoryMetricExporter

    exporter = InMemoryMetricExporter()
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter)])
    ...  # wrap the provider or configure inferscope with it, run inferences
    provider.force_flush()
    [point] = exporter.latest_points("inferscope.inference.duration")
    assert point.count == 3
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    DataPointT,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)

__all__ = ["InMemoryMetricExporter", "metrics_named", "points"]


def metrics_named(metrics_data: Iterable[MetricsData], name: str) -> list[Metric]:
    """Every ``Metric`` called ``name`` in ``metrics_data``, in export order."""
    return [
        metric
        for data in metrics_data
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == name
    ]


def points(metrics_data: Iterable[MetricsData], name: str) -> list[DataPointT]:
    """Every data point of the metric ``name`` in ``metrics_data``, in export order."""
    return [point for metric in metrics_named(metrics_data, name) for point in metric.data.data_points]


class InMemoryMetricExporter(MetricExporter):
    """A ``MetricExporter`` that keeps every exported ``MetricsData`` in memory. Thread-safe.

    ``preferred_temporality`` defaults to cumulative for every instrument kind.

    >>> exporter = InMemoryMetricExporter()
    >>> exporter.get_finished_metrics()
    []
    """

    def __init__(
        self,
        preferred_temporality: Mapping[Any, AggregationTemporality] | None = None,
        preferred_aggregation: Mapping[Any, Any] | None = None,
    ) -> None:
        super().__init__(
            preferred_temporality=dict(preferred_temporality) if preferred_temporality is not None else None,
            preferred_aggregation=dict(preferred_aggregation) if preferred_aggregation is not None else None,
        )
        self._lock = threading.Lock()
        self._exported: list[MetricsData] = []
        self._is_shutdown = False

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        with self._lock:
            if self._is_shutdown:
                return MetricExportResult.FAILURE
            self._exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def get_finished_metrics(self) -> list[MetricsData]:
        """Every batch exported so far, oldest first."""
        with self._lock:
            return list(self._exported)

    def clear(self) -> None:
        """Forget every batch exported so far."""
        with self._lock:
            self._exported.clear()

    def points(self, name: str) -> list[DataPointT]:
        """Every data point of ``name`` across all batches, oldest first."""
        return points(self.get_finished_metrics(), name)

    def latest_points(self, name: str) -> list[DataPointT]:
        """The data points of ``name`` in the most recent batch that has that metric."""
        for data in reversed(self.get_finished_metrics()):
            found = points([data], name)
            if found:
                return found
        return []

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with self._lock:
            self._is_shutdown = True
