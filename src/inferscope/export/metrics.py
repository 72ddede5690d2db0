"""Aggregates → OpenTelemetry metric points (push) and Prometheus metric families (pull).

The ``Aggregator`` is the one source of truth; nothing here keeps counters of its own except the
previous cumulative state that delta temporality needs, and the exporter's count of its own failed
exports.

OTel SDK 1.45 has no MetricProducer, so pre-aggregated points reach an OTLP (or any other)
exporter through :class:`AggregatesExporter`, a ``MetricExporter`` that appends inferscope's
points to every batch the SDK hands it and then delegates. Prometheus scrapes a
:class:`PrometheusCollector` registered on a private ``CollectorRegistry``.

Example::

    reader = PeriodicExportingMetricReader(
        AggregatesExporter(OTLPMetricExporter(), aggregator.view, resource=resource, boundaries=BOUNDS)
    )
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    export_empty_collections(reader)  # export even though the provider has no instruments of its own
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from opentelemetry.sdk.metrics import Exemplar, MeterProvider
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Gauge as GaugeData
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric as PrometheusMetric
from prometheus_client.samples import Exemplar as PrometheusExemplar
from prometheus_client.utils import floatToGoString

from .. import _otel_compat
from .._keys import ERROR_TYPE
from .._selflog import RateLimitedLog, exporter_log
from ..config import ConfigError
from ..counters import CounterMetric, counter_value, counters_of
from . import spec as _spec
from .traces import EXEMPLARS, ExemplarStore

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from ..aggregator import AggregateView, Series
    from ..histogram import Histogram

__all__ = [
    "EXPORTS_FAILED",
    "INFERENCE_ABANDONED",
    "INFERENCE_CPU_TIME",
    "INFERENCE_DURATION",
    "KEYS_OVERFLOWED",
    "RECORDS_DROPPED",
    "SDK_ERRORS",
    "STAGE_CPU_TIME",
    "STAGE_DURATION",
    "STAGE_GPU_TIME",
    "AggregatesExporter",
    "PointBuilder",
    "PrometheusCollector",
    "PrometheusServer",
    "export_empty_collections",
    "signal_metrics",
    "start_prometheus_server",
    "target_info",
    "unwrap_meter_provider",
    "wrap_meter_provider",
]

_logger = logging.getLogger("inferscope")

INFERENCE_DURATION = "inferscope.inference.duration"
INFERENCE_CPU_TIME = "inferscope.inference.cpu.time"
STAGE_DURATION = "inferscope.stage.duration"
STAGE_CPU_TIME = "inferscope.stage.cpu.time"
STAGE_GPU_TIME = "inferscope.stage.gpu.time"
INFERENCE_ABANDONED = "inferscope.inference.abandoned"
RECORDS_DROPPED = "inferscope.sdk.records.dropped"
SPANS_DROPPED = "inferscope.sdk.spans.dropped"
KEYS_OVERFLOWED = "inferscope.sdk.keys.overflowed"
SDK_ERRORS = "inferscope.sdk.errors"
EXPORTS_FAILED = "inferscope.sdk.exports.failed"

SCOPE_NAME = "inferscope"
AGGREGATIONS = ("exponential", "explicit")
DROP_REASON = "reason"

#: The histograms whose points carry exemplars of kept spans (export/traces.py).
_EXEMPLAR_HISTOGRAMS = frozenset({INFERENCE_DURATION, STAGE_DURATION})
#: The histograms of the specification, in its order; names, units and descriptions come from it.
_HISTOGRAMS = tuple(name for name, entry in _spec.METRICS.items() if entry.kind == "histogram")

Attributes = dict[str, "str | bool"]
_AttributesKey = tuple[tuple[str, "str | bool"], ...]


def _scope_version() -> str:
    from .._version import __version__

    return __version__


def _check_boundaries(boundaries: Sequence[float]) -> list[float]:
    bounds = [float(b) for b in boundaries]
    if any(not b < c for b, c in pairwise(bounds)):
        raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)!r}")
    return bounds


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _series_attributes(series: Series) -> Attributes:
    attrs: Attributes = dict(series.info.metric_attributes)
    if series.error_type is not None:
        attrs[ERROR_TYPE] = series.error_type
    return attrs


def _attributes_key(attrs: Mapping[str, str | bool]) -> _AttributesKey:
    return tuple(sorted(attrs.items()))


def _merged(histograms: list[Histogram]) -> Histogram:
    if len(histograms) == 1:
        return histograms[0]
    merged = histograms[0].copy()  # never mutate the view's histograms
    for other in histograms[1:]:
        merged.merge(other)
    return merged


def series_counters(
    series: Series, metrics: Sequence[CounterMetric]
) -> list[tuple[str, Attributes, int, CounterMetric]]:
    """The per-stage (or per-inference) counters of one series, as (metric name, attributes, total)."""
    scope = "stage" if series.info.kind == "stage" else "inference"
    base = _series_attributes(series)
    metrics = counters_of(metrics, scope)
    return [
        (
            f"inferscope.{scope}.{metric.suffix}",
            {**base, **dict(metric.attributes)},
            counter_value(metric, series.counters, series.duration.count),
            metric,
        )
        for metric in metrics
    ]


class PointBuilder:
    """Turns an ``AggregateView`` into OTel ``Metric`` objects.

    The aggregates are cumulative. For cumulative temporality the builder is stateless; for delta
    it keeps, per series, the cumulative state it last exported and emits the difference.

    >>> builder = PointBuilder(boundaries=[0.01, 0.1, 1.0])
    >>> metrics = builder.build(aggregator.view(), time.time_ns())  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        aggregation: str = "exponential",
        boundaries: Sequence[float],
        max_buckets: int = 320,
        temporality: AggregationTemporality = AggregationTemporality.CUMULATIVE,
        counters: Sequence[CounterMetric] = (),
        exemplars: ExemplarStore | None = EXEMPLARS,
    ) -> None:
        _check_aggregation(aggregation)
        self.counters = tuple(counters)
        #: Where the duration histograms' exemplars come from: the spans the tracer kept.
        self.exemplars = exemplars
        self._exemplars_since_unix_nano = 0
        if max_buckets < 2:
            # One bucket cannot hold values on both sides of 1 s at any scale OTel allows.
            raise ValueError(f"max_buckets must be at least 2, got {max_buckets!r}")
        self.aggregation = aggregation
        self.boundaries = _check_boundaries(boundaries)
        self.max_buckets = max_buckets
        self.temporality = temporality
        # Delta state: the cumulative values of the last build, and when it ran.
        self._previous_histograms: dict[tuple[str, int, int], Histogram] = {}
        self._previous_counts: dict[tuple[str, _AttributesKey], int] = {}
        self._previous_time_unix_nano: int | None = None
        self._view_start_unix_nano: int | None = None
        #: The per-series counters that have had a point: (metric name, attributes).
        self._moved: set[tuple[str, _AttributesKey]] = set()

    @property
    def _delta(self) -> bool:
        return self.temporality is AggregationTemporality.DELTA

    def build(
        self, view: AggregateView, time_unix_nano: int, extra_counts: Mapping[str, int] | None = None
    ) -> list[Metric]:
        """The metrics of ``view`` at ``time_unix_nano``.

        ``extra_counts`` maps further monotonic counter names (e.g. ``EXPORTS_FAILED``) to their
        cumulative totals; each becomes a Sum without attributes.
        """
        if self._delta and view.start_time_unix_nano != self._view_start_unix_nano:
            # The aggregates were reset (e.g. after fork): nothing exported before relates to them.
            self._previous_histograms.clear()
            self._previous_counts.clear()
            self._previous_time_unix_nano = None
            self._view_start_unix_nano = view.start_time_unix_nano
        if self._delta and self._previous_time_unix_nano is not None:
            start_unix_nano = self._previous_time_unix_nano
        else:
            start_unix_nano = view.start_time_unix_nano

        next_histograms: dict[tuple[str, int, int], Histogram] = {}
        next_counts: dict[tuple[str, _AttributesKey], int] = {}
        histograms: dict[str, dict[_AttributesKey, tuple[Attributes, list[Histogram], list[Exemplar]]]] = {
            name: {} for name in _HISTOGRAMS
        }
        exemplars_since, self._exemplars_since_unix_nano = self._exemplars_since_unix_nano, time_unix_nano
        abandoned: dict[_AttributesKey, tuple[Attributes, int]] = {}
        per_series_counters: dict[tuple[str, _AttributesKey], tuple[Attributes, int]] = {}
        counter_kinds: dict[str, CounterMetric] = {}

        def add_histogram(name: str, series: Series, attrs: Attributes, cumulative: Histogram) -> None:
            interval = self._interval(name, series, cumulative, next_histograms)
            if interval is None:
                return
            _, group, exemplars = histograms[name].setdefault(_attributes_key(attrs), (attrs, [], []))
            group.append(interval)
            if self.exemplars is not None and name in _EXEMPLAR_HISTOGRAMS and series.error_id == 0:
                exemplars.extend(self.exemplars.since(series.info.key, exemplars_since))

        for series in view.series:
            attrs = _series_attributes(series)
            is_stage = series.info.kind == "stage"
            add_histogram(STAGE_DURATION if is_stage else INFERENCE_DURATION, series, attrs, series.duration)
            if series.cpu is not None:
                add_histogram(STAGE_CPU_TIME if is_stage else INFERENCE_CPU_TIME, series, attrs, series.cpu)
            if series.gpu is not None and is_stage:
                add_histogram(STAGE_GPU_TIME, series, attrs, series.gpu)
            if not is_stage and series.abandoned > 0:
                key = _attributes_key(attrs)
                _, total = abandoned.get(key, (attrs, 0))
                abandoned[key] = (attrs, total + int(series.abandoned))
            for name, counter_attrs, total, described in series_counters(series, self.counters):
                key = _attributes_key(counter_attrs)
                _, before = per_series_counters.get((name, key), (counter_attrs, 0))
                per_series_counters[(name, key)] = (counter_attrs, before + total)
                counter_kinds[name] = described

        metrics: list[Metric] = []
        for name, groups in histograms.items():
            points = [
                self._histogram_point(attrs, _merged(group), start_unix_nano, time_unix_nano, exemplars)
                for attrs, group, exemplars in groups.values()
            ]
            if points:
                metrics.append(self._histogram_metric(name, points))

        counters: list[tuple[str, Attributes, int]] = [
            (INFERENCE_ABANDONED, attrs, total) for attrs, total in abandoned.values()
        ]
        counters += [(name, attrs, total) for (name, _), (attrs, total) in per_series_counters.items()]
        counters += [(RECORDS_DROPPED, {DROP_REASON: reason}, int(n)) for reason, n in view.dropped.items()]
        counters += [(SPANS_DROPPED, {DROP_REASON: r}, int(n)) for r, n in view.spans_dropped.items()]
        counters.append((KEYS_OVERFLOWED, {}, int(view.keys_overflowed)))
        counters.append((SDK_ERRORS, {}, int(view.internal_errors)))
        counters += [(name, {}, int(n)) for name, n in (extra_counts or {}).items()]

        sums: dict[str, list[NumberDataPoint]] = {}
        for name, attrs, total in counters:
            kind = counter_kinds.get(name)
            value = self._counter_interval(
                name, attrs, total, next_counts, monotonic=kind is None or kind.monotonic
            )
            # Per-series counters have points once their total is not zero, as the OTel SDK makes
            # none before a measurement, and not in a delta interval where nothing happened. Once
            # it moved, a cumulative series stays: an up-down change (RSS, the Python heap) back at
            # 0 is a value, and its series must not vanish from the backend. The SDK's own counters
            # are always sent so that a dashboard sees them at 0.
            if value is None:
                continue
            if name == INFERENCE_ABANDONED or name in counter_kinds:
                series_key = (name, _attributes_key(attrs))
                if value != 0:
                    self._moved.add(series_key)
                elif self._delta or series_key not in self._moved:
                    continue
            sums.setdefault(name, []).append(
                NumberDataPoint(
                    attributes=attrs,
                    start_time_unix_nano=start_unix_nano,
                    time_unix_nano=time_unix_nano,
                    value=value,
                )
            )
        for name, number_points in sums.items():
            entry = _spec.get(name)
            metrics.append(
                Metric(
                    name=name,
                    description=entry.description,
                    unit=entry.unit,
                    data=Sum(
                        data_points=number_points,
                        aggregation_temporality=self.temporality,
                        is_monotonic=entry.monotonic,
                    ),
                )
            )

        if self._delta:
            self._previous_histograms = next_histograms
            self._previous_counts = next_counts
            self._previous_time_unix_nano = time_unix_nano
        return metrics

    def _interval(
        self,
        name: str,
        series: Series,
        cumulative: Histogram,
        next_state: dict[tuple[str, int, int], Histogram],
    ) -> Histogram | None:
        """What to export for one series: the cumulative state, or its change since the last build."""
        if not self._delta:
            return cumulative if cumulative.count > 0 else None
        key = (name, series.info.key, series.error_id)
        # The view's histograms may keep changing after the view is taken; keep our own copy.
        next_state[key] = cumulative.copy()
        previous = self._previous_histograms.get(key)
        if previous is None or previous.count > cumulative.count:
            return cumulative if cumulative.count > 0 else None
        if previous.count == cumulative.count:
            return None
        return cumulative.minus(previous)

    def _counter_interval(
        self,
        name: str,
        attrs: Attributes,
        total: int,
        next_state: dict[tuple[str, _AttributesKey], int],
        monotonic: bool = True,
    ) -> int | None:
        if not self._delta:
            return total
        key = (name, _attributes_key(attrs))
        next_state[key] = total
        previous = self._previous_counts.get(key, 0)
        # A monotonic count that fell was reset (a fork starts the aggregates over): its interval
        # is all of it. An up-down change (RSS) may fall: its interval is negative.
        return total - previous if total >= previous or not monotonic else total

    def _histogram_point(
        self,
        attrs: Attributes,
        histogram: Histogram,
        start_unix_nano: int,
        time_unix_nano: int,
        exemplars: Sequence[Exemplar] = (),
    ) -> ExponentialHistogramDataPoint | HistogramDataPoint:
        if self.aggregation == "explicit":
            return HistogramDataPoint(
                attributes=attrs,
                start_time_unix_nano=start_unix_nano,
                time_unix_nano=time_unix_nano,
                count=int(histogram.count),
                sum=float(histogram.sum),
                bucket_counts=[int(c) for c in histogram.explicit_bucket_counts(self.boundaries)],
                explicit_bounds=list(self.boundaries),
                min=float(histogram.min),
                max=float(histogram.max),
                exemplars=list(exemplars),
            )
        histogram = histogram.downscaled(self.max_buckets)  # a copy at the same scale when it fits
        counts = np.asarray(histogram.counts, dtype=np.int64)
        nonzero = np.flatnonzero(counts)
        if len(nonzero):
            offset = int(histogram.offset) + int(nonzero[0])
            bucket_counts = counts[nonzero[0] : nonzero[-1] + 1].tolist()
        else:
            offset, bucket_counts = 0, []
        return ExponentialHistogramDataPoint(
            attributes=attrs,
            start_time_unix_nano=start_unix_nano,
            time_unix_nano=time_unix_nano,
            count=int(histogram.count),
            sum=float(histogram.sum),
            scale=int(histogram.scale),
            zero_count=int(histogram.zero_count),
            positive=Buckets(offset=offset, bucket_counts=bucket_counts),
            negative=Buckets(offset=0, bucket_counts=[]),
            flags=0,
            min=float(histogram.min),
            max=float(histogram.max),
            exemplars=list(exemplars),
        )

    def _histogram_metric(self, name: str, points: Sequence[Any]) -> Metric:
        data: ExponentialHistogram | HistogramData
        if self.aggregation == "explicit":
            data = HistogramData(data_points=points, aggregation_temporality=self.temporality)
        else:
            data = ExponentialHistogram(data_points=points, aggregation_temporality=self.temporality)
        entry = _spec.get(name)
        return Metric(name=name, description=entry.description, unit=entry.unit, data=data)


def signal_metrics(
    signals: Sequence[_spec.Signal], time_unix_nano: int, start_unix_nano: int
) -> list[Metric]:
    """OTel metrics from the current points of sampled signals (the tax meter's providers): gauges,
    and cumulative sums for counters and up-down counters. A signal without points is left out."""
    metrics: list[Metric] = []
    for signal in signals:
        observations = signal.observe()
        if not observations:
            continue
        entry = signal.spec
        number_points = [
            NumberDataPoint(
                attributes=dict(o.attributes or {}),
                start_time_unix_nano=start_unix_nano,
                time_unix_nano=time_unix_nano,
                value=o.value,
            )
            for o in observations
        ]
        data: GaugeData | Sum
        if entry.kind == "gauge":
            data = GaugeData(data_points=number_points)
        else:
            data = Sum(
                data_points=number_points,
                aggregation_temporality=AggregationTemporality.CUMULATIVE,
                is_monotonic=entry.monotonic,
            )
        metrics.append(Metric(name=entry.name, description=entry.description, unit=entry.unit, data=data))
    return metrics


def _provided_signals() -> list[_spec.Signal]:
    """The provider metrics (the tax meter's), each made safe: a provider that raises costs its own
    points only, counted and logged at most once a minute."""
    from ..system.host import GUARD

    return [
        _spec.Signal(signal.spec, GUARD.guarded(signal.spec.name, signal.observe))
        for signal in _spec.provided_signals()
    ]


def _with_scope(metrics_data: MetricsData, resource: Resource, scope_metrics: ScopeMetrics) -> MetricsData:
    """``metrics_data`` with ``scope_metrics`` added under ``resource`` (a new ResourceMetrics if absent).

    Where the batch already holds a ScopeMetrics of the same scope (the SDK's ``inferscope`` meter,
    which carries the process, host and container signals), the metrics are merged into it: the
    OTLP encoder keys scopes by their InstrumentationScope, so a second ScopeMetrics of the same
    scope would replace the first and lose its metrics.
    """
    resource_metrics = list(metrics_data.resource_metrics)
    for i, found in enumerate(resource_metrics):
        if found.resource == resource:
            scopes = list(found.scope_metrics)
            for j, existing in enumerate(scopes):
                if existing.scope == scope_metrics.scope:
                    scopes[j] = replace(existing, metrics=[*existing.metrics, *scope_metrics.metrics])
                    break
            else:
                scopes.append(scope_metrics)
            resource_metrics[i] = replace(found, scope_metrics=scopes)
            break
    else:
        resource_metrics.append(
            ResourceMetrics(resource=resource, scope_metrics=[scope_metrics], schema_url=resource.schema_url)
        )
    return MetricsData(resource_metrics=resource_metrics)


class AggregatesExporter(MetricExporter):
    """Wraps any ``MetricExporter``: appends inferscope's points (scope ``inferscope``) to every export.

    It never raises: failures of ``source``, of building the points, or of the delegate are
    counted in ``failed_exports`` (exported as ``inferscope.sdk.exports.failed``), logged at most
    once a minute, and reported as ``MetricExportResult.FAILURE``. While ``active`` is False
    (after fork, until the pipeline is rebuilt) it adds nothing and only forwards the SDK's data.

    >>> exporter = AggregatesExporter(
    ...     OTLPMetricExporter(), aggregator.view, resource=Resource.create(), boundaries=[0.1, 1.0]
    ... )  # doctest: +SKIP
    """

    def __init__(
        self,
        delegate: MetricExporter,
        source: Callable[[], AggregateView],
        *,
        resource: Resource,
        aggregation: str = "exponential",
        boundaries: Sequence[float],
        max_buckets: int = 320,
        owns_delegate: bool = True,
        counters: Sequence[CounterMetric] = (),
    ) -> None:
        # The SDK reader asks its exporter for temporality and aggregation; answer as the delegate would.
        preferred_temporality, preferred_aggregation = _otel_compat.exporter_preferences(delegate)
        super().__init__(
            preferred_temporality=preferred_temporality, preferred_aggregation=preferred_aggregation
        )
        temporality = (preferred_temporality or {}).get(
            HistogramInstrument, AggregationTemporality.CUMULATIVE
        )
        self.delegate = delegate
        #: False for an exporter the application handed over: shutdown() then only flushes it, so the
        #: application can pass the same instance to a later configure().
        self.owns_delegate = owns_delegate
        self.resource = resource
        self.active = True
        #: Exports that failed (raised, or the delegate reported FAILURE).
        self.failed_exports = 0
        self._source = source
        self._builder = PointBuilder(
            aggregation=aggregation,
            boundaries=boundaries,
            max_buckets=max_buckets,
            temporality=temporality,
            counters=counters,
        )
        self._scope = InstrumentationScope(SCOPE_NAME, _scope_version())
        self._signals = _provided_signals()
        self._log = exporter_log(delegate)  # one line a minute, with the exporter's own

    @property
    def temporality(self) -> AggregationTemporality:
        return self._builder.temporality

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        failed = False
        outgoing = metrics_data
        if self.active:
            try:
                view = self._source()
                now = time.time_ns()
                metrics = self._builder.build(view, now, {EXPORTS_FAILED: self.failed_exports})
                metrics += signal_metrics(self._signals, now, view.start_time_unix_nano)
                scope_metrics = ScopeMetrics(scope=self._scope, metrics=metrics, schema_url="")
                outgoing = _with_scope(metrics_data, self.resource, scope_metrics)
            except Exception:  # the user's own metrics still go out below
                failed = True
                self._log.warning("inferscope: building metric points failed", exc_info=True)
        if outgoing is metrics_data and not metrics_data.resource_metrics:
            # Nothing of the SDK's and nothing of ours (inactive, or building failed): send nothing.
            if failed:
                self.failed_exports += 1
                return MetricExportResult.FAILURE
            return MetricExportResult.SUCCESS
        try:
            result = self.delegate.export(outgoing, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            failed = True
            self._log.warning("inferscope: the metric exporter raised", exc_info=True)
        else:
            if result is MetricExportResult.FAILURE:
                failed = True
                self._log.warning(f"inferscope: metric export failed ({type(self.delegate).__name__})")
        if failed:
            self.failed_exports += 1
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return bool(self.delegate.force_flush(timeout_millis=timeout_millis))
        except Exception:
            self._log.warning("inferscope: force_flush of the metric exporter raised", exc_info=True)
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        try:
            if self.owns_delegate:
                self.delegate.shutdown(timeout_millis=timeout_millis, **kwargs)
            else:
                self.delegate.force_flush(timeout_millis=timeout_millis)
        except Exception:
            self._log.warning("inferscope: shutdown of the metric exporter raised", exc_info=True)


class _CollectOrEmpty:
    """A reader's collect callback that yields an empty batch instead of None.

    The SDK skips the export when it collected nothing, which is always the case for a
    MeterProvider whose only content is inferscope's pre-aggregated points.
    """

    def __init__(self, original: Callable[..., MetricsData | None]) -> None:
        self.original = original

    def __call__(self, reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData:
        collected = self.original(reader, timeout_millis=timeout_millis)
        return collected if collected is not None else MetricsData(resource_metrics=[])


def export_empty_collections(reader: MetricReader) -> None:
    """Make ``reader`` call its exporter even when the SDK itself collected nothing.

    Call it after the reader is registered with its ``MeterProvider``. Idempotent.

    >>> provider = MeterProvider(metric_readers=[reader])  # doctest: +SKIP
    >>> export_empty_collections(reader)  # doctest: +SKIP
    """
    collect = _otel_compat.reader_collect(reader)
    if collect is None or isinstance(collect, _CollectOrEmpty | _CollectWithAggregates):
        return
    _otel_compat.set_reader_collect(reader, _CollectOrEmpty(collect))


class _CollectWithAggregates:
    """A reader's collect callback that adds inferscope's points to what the SDK collected.

    This is how a reader without an exporter of its own (``InMemoryMetricReader``, a pull reader
    such as OTel's Prometheus reader, any custom ``MetricReader``) gets inferscope's histograms:
    every ``reader.collect()`` goes through here, whatever the reader does with the result.
    """

    def __init__(
        self,
        original: Callable[..., MetricsData | None],
        source: Callable[[], AggregateView],
        *,
        resource: Resource,
        builder: PointBuilder,
    ) -> None:
        self.original = original
        self.resource = resource
        self.active = True
        #: Collections whose inferscope points could not be built (the SDK's points still went out).
        self.failed_collections = 0
        self._source = source
        self._builder = builder
        self._lock = threading.Lock()  # a delta builder keeps state; collections may overlap
        _collectors.add(self)
        self._scope = InstrumentationScope(SCOPE_NAME, _scope_version())
        self._signals = _provided_signals()
        self._log = RateLimitedLog(_logger, per_message=False)

    def __call__(self, reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        collected = self.original(reader, timeout_millis=timeout_millis)
        if not self.active:
            return collected
        try:
            view = self._source()
            now = time.time_ns()
            with self._lock:
                metrics = self._builder.build(view, now)
            metrics += signal_metrics(self._signals, now, view.start_time_unix_nano)
            scope_metrics = ScopeMetrics(scope=self._scope, metrics=metrics, schema_url="")
            return _with_scope(collected or MetricsData(resource_metrics=[]), self.resource, scope_metrics)
        except Exception:
            self.failed_collections += 1
            self._log.warning(
                "inferscope: adding inferscope's points to a metric reader failed", exc_info=True
            )
            return collected

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


@dataclass
class _Wrapped:
    wrapper: AggregatesExporter | _CollectWithAggregates
    exporter: MetricExporter | None
    collect: Callable[..., MetricsData | None] | None
    patched_collect: Callable[..., MetricsData | None] | None


_wrapped_readers: weakref.WeakKeyDictionary[MetricReader, _Wrapped] = weakref.WeakKeyDictionary()
_wrap_lock = threading.Lock()


#: Every collect wrapper alive, so that a fork resets their locks.
_collectors: weakref.WeakSet[_CollectWithAggregates] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Only the forking thread survives fork(): a lock another thread held would stay taken.
    global _wrap_lock
    _wrap_lock = threading.Lock()
    for collector in list(_collectors):
        collector.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unsupported_provider(provider: MeterProvider, why: str) -> ConfigError:
    return ConfigError(
        "meter_provider",
        provider,
        "an opentelemetry-sdk MeterProvider whose readers inferscope can join "
        f"(tested with the versions in constraints/otel.txt); {why}",
    )


def wrap_meter_provider(
    provider: MeterProvider,
    source: Callable[[], AggregateView],
    *,
    aggregation: str = "exponential",
    boundaries: Sequence[float],
    max_buckets: int = 320,
    counters: Sequence[CounterMetric] = (),
) -> list[AggregatesExporter]:
    """Make inferscope's points ride along with every collection of a user's own ``MeterProvider``.

    Every reader kind is joined. The exporter of each ``PeriodicExportingMetricReader`` is wrapped
    in an :class:`AggregatesExporter` (which also counts failed exports), and the reader exports
    even when the provider has no instruments of its own. Any other reader (``InMemoryMetricReader``,
    a pull reader) gets inferscope's points added to each of its collections. All use the
    provider's resource, and the temporality each reader asks for. Idempotent; undone exactly by
    :func:`unwrap_meter_provider`. Returns the exporter wrappers.

    Raises ``ConfigError`` (setting ``meter_provider``) when the installed SDK keeps its readers
    where inferscope cannot reach them; nothing is changed then.

    >>> wrappers = wrap_meter_provider(provider, aggregator.view, boundaries=[0.1, 1.0])  # doctest: +SKIP
    """
    resource = _otel_compat.provider_resource(provider)
    readers = _otel_compat.provider_readers(provider)
    if resource is None or not all(_otel_compat.has_collect(reader) for reader in readers):
        _otel_compat.warn_once(
            "joining an application's MeterProvider", "MeterProvider._sdk_config or MetricReader._collect"
        )
        raise _unsupported_provider(provider, "this SDK keeps its Resource or reader callbacks elsewhere")
    wrappers: list[AggregatesExporter] = []
    builder_options: dict[str, Any] = {
        "aggregation": aggregation,
        "boundaries": boundaries,
        "max_buckets": max_buckets,
        "counters": counters,
    }
    with _wrap_lock:
        for reader in readers:
            known = _wrapped_readers.get(reader)
            if isinstance(reader, PeriodicExportingMetricReader):
                if known is not None and _otel_compat.reader_exporter(reader) is known.wrapper:
                    wrappers.append(known.wrapper)  # type: ignore[arg-type]
                    continue
                exporter: MetricExporter = _otel_compat.reader_exporter(reader)
                wrapper = AggregatesExporter(exporter, source, resource=resource, **builder_options)
                original_collect = _otel_compat.reader_collect(reader)
                _otel_compat.set_reader_exporter(reader, wrapper)
                export_empty_collections(reader)
                patched = _otel_compat.reader_collect(reader)
                _wrapped_readers[reader] = _Wrapped(
                    wrapper=wrapper,
                    exporter=exporter,
                    collect=original_collect,
                    patched_collect=patched if patched is not original_collect else None,
                )
                wrappers.append(wrapper)
                continue
            original = _otel_compat.reader_collect(reader)
            if known is not None and original is known.wrapper:
                continue
            if original is None:
                continue  # a reader being removed from its provider
            builder = PointBuilder(
                temporality=_otel_compat.reader_temporality(reader, HistogramInstrument), **builder_options
            )
            collector = _CollectWithAggregates(original, source, resource=resource, builder=builder)
            _otel_compat.set_reader_collect(reader, collector)
            _wrapped_readers[reader] = _Wrapped(
                wrapper=collector, exporter=None, collect=original, patched_collect=collector
            )
    return wrappers


def unwrap_meter_provider(provider: MeterProvider) -> None:
    """Undo :func:`wrap_meter_provider`: every reader gets back its original exporter and callback."""
    with _wrap_lock:
        for reader in _otel_compat.provider_readers(provider):
            wrapped = _wrapped_readers.pop(reader, None)
            if wrapped is None:
                continue
            if wrapped.exporter is not None and _otel_compat.reader_exporter(reader) is wrapped.wrapper:
                _otel_compat.set_reader_exporter(reader, wrapped.exporter)
            # Restore the callback only if nobody replaced it since (the provider sets None on removal).
            if (
                wrapped.patched_collect is not None
                and _otel_compat.reader_collect(reader) is wrapped.patched_collect
            ):
                _otel_compat.set_reader_collect(reader, wrapped.collect)


# --- Prometheus -----------------------------------------------------------------------------------

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_label_name(attribute: str) -> str:
    """The Prometheus label for an OTel attribute name, as the standard conversion spells it."""
    name = _INVALID_LABEL_CHARS.sub("_", attribute)
    if name[:1].isdigit():
        name = "key_" + name
    return name


def _label_value(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _labels(attrs: Mapping[str, str | bool]) -> dict[str, str]:
    labels: dict[str, str] = {}
    # Two attributes that sanitize to the same label are joined with ";" (sorted by attribute name).
    for key in sorted(attrs):
        label = prometheus_label_name(key)
        value = _label_value(attrs[key])
        labels[label] = f"{labels[label]};{value}" if label in labels else value
    return labels


class PrometheusCollector:
    """A ``prometheus_client`` custom collector over the aggregates, with explicit buckets.

    Each scrape also samples ``signals``: by default the process, host, container and GPU signals
    of this machine (``system/host.py``) and the provider metrics of the specification (the tax
    meter's). With a ``resource``, its attributes are served as ``target_info``, as the OTel
    Prometheus conversion does, so that a query can join on service and environment fingerprint.

    >>> registry = CollectorRegistry()
    >>> registry.register(PrometheusCollector(aggregator.view, boundaries=[0.01, 0.1, 1.0]))  # doctest: +SKIP
    """

    def __init__(
        self,
        source: Callable[[], AggregateView],
        boundaries: Sequence[float],
        extra_counts: Callable[[], Mapping[str, int]] | None = None,
        counters: Sequence[CounterMetric] = (),
        exemplars: ExemplarStore | None = EXEMPLARS,
        *,
        signals: Sequence[_spec.Signal] | None = None,
        resource: Resource | None = None,
    ) -> None:
        if signals is None:
            from ..system.host import system_signals

            signals = [*system_signals(), *_provided_signals()]
        #: What each scrape samples besides the aggregates.
        self.signals = tuple(signal for signal in signals if signal.spec.prometheus)
        self.resource = resource
        self._source = source
        self.counters = tuple(counters)
        #: The kept spans whose exemplars the duration buckets carry (OpenMetrics scrapes only).
        self.exemplars = exemplars
        self.boundaries = _check_boundaries(boundaries)
        self._le = [floatToGoString(b) for b in self.boundaries]  # type: ignore[no-untyped-call]
        self._extra_counts = extra_counts
        self._log = RateLimitedLog(_logger, per_message=False)

    def describe(self) -> list[PrometheusMetric]:
        # Returning nothing keeps registration from calling collect() (which drains the ring).
        return []

    def collect(self) -> Iterable[PrometheusMetric]:
        try:
            return self._collect()
        except Exception:
            self._log.warning("inferscope: collecting Prometheus metrics failed", exc_info=True)
            return []

    def _collect(self) -> list[PrometheusMetric]:
        view = self._source()
        histograms: dict[str, list[tuple[dict[str, str], Histogram, list[Exemplar]]]] = {
            name: [] for name in _HISTOGRAMS
        }
        abandoned: list[tuple[dict[str, str], int]] = []
        per_series: dict[str, tuple[CounterMetric, list[tuple[dict[str, str], int]]]] = {}
        for series in view.series:
            labels = _labels(_series_attributes(series))
            is_stage = series.info.kind == "stage"
            if series.duration.count > 0:
                exemplars = (
                    self.exemplars.since(series.info.key, 0)
                    if self.exemplars is not None and series.error_id == 0
                    else []
                )
                histograms[STAGE_DURATION if is_stage else INFERENCE_DURATION].append(
                    (labels, series.duration, exemplars)
                )
            if series.cpu is not None and series.cpu.count > 0:
                histograms[STAGE_CPU_TIME if is_stage else INFERENCE_CPU_TIME].append(
                    (labels, series.cpu, [])
                )
            if series.gpu is not None and series.gpu.count > 0 and is_stage:
                histograms[STAGE_GPU_TIME].append((labels, series.gpu, []))
            if not is_stage and series.abandoned > 0:
                abandoned.append((labels, int(series.abandoned)))
            for name, attrs, total, described in series_counters(series, self.counters):
                per_series.setdefault(name, (described, []))[1].append((_labels(attrs), total))

        families: list[PrometheusMetric] = []
        for name, (described, totals) in per_series.items():
            families.append(self._counter_family(name, totals, described))
        for name, rows in histograms.items():
            if rows:
                families.append(self._histogram_family(name, rows))
        if abandoned:
            families.append(self._counter_family(INFERENCE_ABANDONED, abandoned))
        families.append(
            self._counter_family(
                RECORDS_DROPPED, [({DROP_REASON: r}, int(n)) for r, n in view.dropped.items()]
            )
        )
        if view.spans_dropped:
            families.append(
                self._counter_family(
                    SPANS_DROPPED, [({DROP_REASON: r}, int(n)) for r, n in view.spans_dropped.items()]
                )
            )
        families.append(self._counter_family(KEYS_OVERFLOWED, [({}, int(view.keys_overflowed))]))
        families.append(self._counter_family(SDK_ERRORS, [({}, int(view.internal_errors))]))
        if self._extra_counts is not None:
            for name, total in self._extra_counts().items():
                families.append(self._counter_family(name, [({}, int(total))]))
        families += self._signal_families()
        if self.resource is not None:
            families.append(target_info(self.resource))
        return families

    def _signal_families(self) -> list[PrometheusMetric]:
        families: list[PrometheusMetric] = []
        for signal in self.signals:
            observations = signal.observe()  # guarded: never raises
            if not observations:
                continue
            entry = signal.spec
            rows = [(_prometheus_labels(o.attributes or {}), float(o.value)) for o in observations]
            label_names = sorted({label for labels, _ in rows for label in labels})
            family: CounterMetricFamily | GaugeMetricFamily
            if entry.kind == "counter":
                family = CounterMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
            else:
                family = GaugeMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
            for labels, value in rows:
                family.add_metric([labels.get(n, "") for n in label_names], value)
            families.append(family)
        return families

    def _histogram_family(
        self, name: str, rows: list[tuple[dict[str, str], Histogram, list[Exemplar]]]
    ) -> PrometheusMetric:
        label_names = sorted({label for labels, _, _ in rows for label in labels})
        grouped: dict[tuple[str, ...], tuple[list[Histogram], list[Exemplar]]] = {}
        for labels, histogram, exemplars in rows:
            # Every sample of a family carries the same label names; absent ones are "".
            group, found = grouped.setdefault(tuple(labels.get(n, "") for n in label_names), ([], []))
            group.append(histogram)
            found.extend(exemplars)
        entry = _spec.get(name)
        family = HistogramMetricFamily(
            entry.prometheus_name, entry.description, labels=label_names, unit=_PROMETHEUS_SECONDS
        )
        for values, (group, exemplars) in grouped.items():
            histogram = _merged(group)
            cumulative = list(accumulate(int(c) for c in histogram.explicit_bucket_counts(self.boundaries)))
            counts = [*cumulative[:-1], int(histogram.count)]
            newest = self._bucket_exemplars(exemplars)
            buckets: list[Any] = []
            for i, (le, n) in enumerate(zip([*self._le, "+Inf"], counts, strict=True)):
                exemplar = newest.get(i)
                buckets.append((le, float(n)) if exemplar is None else (le, float(n), exemplar))
            family.add_metric(list(values), buckets, float(histogram.sum))
        return family

    def _bucket_exemplars(self, exemplars: Sequence[Exemplar]) -> dict[int, PrometheusExemplar]:
        """Per bucket index, the newest exemplar whose value falls in it, as OpenMetrics carries it:
        the trace and span id as hex labels, the value in seconds, the time in seconds."""
        newest: dict[int, Exemplar] = {}
        for exemplar in exemplars:
            index = bisect.bisect_left(self.boundaries, exemplar.value)  # a bucket's le is inclusive
            found = newest.get(index)
            if found is None or exemplar.time_unix_nano > found.time_unix_nano:
                newest[index] = exemplar
        return {
            index: PrometheusExemplar(
                {"trace_id": f"{e.trace_id:032x}", "span_id": f"{e.span_id:016x}"},
                float(e.value),
                e.time_unix_nano / 1e9,
            )
            for index, e in newest.items()
            if e.trace_id and e.span_id
        }

    def _counter_family(
        self, name: str, rows: list[tuple[dict[str, str], int]], described: CounterMetric | None = None
    ) -> PrometheusMetric:
        label_names = sorted({label for labels, _ in rows for label in labels})
        totals: dict[tuple[str, ...], int] = {}
        for labels, total in rows:
            values = tuple(labels.get(n, "") for n in label_names)
            totals[values] = totals.get(values, 0) + total
        entry = _spec.get(name)
        family: CounterMetricFamily | GaugeMetricFamily
        if entry.kind == "counter":
            family = CounterMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
        else:
            # A change that can go either way (memory) is a gauge of the running total in Prometheus.
            family = GaugeMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
        for values, total in totals.items():
            family.add_metric(list(values), float(total))
        return family


_PROMETHEUS_SECONDS = "seconds"
#: The paths the endpoint answers; any other is a 404.
METRICS_PATHS = frozenset({"/metrics", "/metrics/"})


def target_info(resource: Resource) -> PrometheusMetric:
    """The resource as Prometheus's ``target_info`` (value 1, one label per resource attribute),
    as the OTel-to-Prometheus conversion spells it."""
    return InfoMetricFamily("target", "Target metadata", value=_prometheus_labels(resource.attributes))


def _prometheus_labels(attributes: Mapping[str, Any]) -> dict[str, str]:
    return _labels({key: _resource_value(value) for key, value in attributes.items()})


def _resource_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _metrics_only(app: WSGIApplication) -> WSGIApplication:
    """``app`` on ``/metrics``; 404 on every other path."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in METRICS_PATHS:
            served: Iterable[bytes] = app(environ, start_response)
            return served
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"Not Found: inferscope serves metrics on /metrics\n"]

    return serve


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for each scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class PrometheusServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful with port 0)."""

    port: int
    host: str
    registry: CollectorRegistry
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def socket_close_in_child(self) -> None:
        """In a forked child: close this process's copy of the listening socket (the parent's stays open)."""
        self._server.socket.close()

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        """Stop serving and close the socket. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_millis / 1e3)


def start_prometheus_server(
    collector: PrometheusCollector, host: str = "127.0.0.1", port: int = 9464
) -> PrometheusServer:
    """Serve ``collector`` on ``http://host:port/metrics`` from a daemon thread; other paths get 404.

    It uses its own ``CollectorRegistry``, never prometheus_client's global one. Raises OSError
    when the address cannot be resolved or bound.

    >>> collector = PrometheusCollector(aggregator.view, [0.1, 1.0])  # doctest: +SKIP
    >>> server = start_prometheus_server(collector, port=0)  # doctest: +SKIP
    >>> server.shutdown()  # doctest: +SKIP
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # The address family of the host (an IPv6 literal, say), as prometheus_client picks it.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(
        str(sockaddr[0]), port, _metrics_only(make_wsgi_app(registry)), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="inferscope-prometheus", daemon=True)
    thread.start()
    return PrometheusServer(
        port=int(server.server_port), host=host, registry=registry, _server=server, _thread=thread
    )
