"""Aggregates → OpenTelemetry ``Metric`` objects: the metric names and the point builder.

What turns an ``AggregateView`` into OTel points, whatever carries them afterwards: the metric
name constants, :func:`series_counters`, :class:`PointBuilder` (cumulative or delta) and
:func:`signal_metrics` for sampled signals. It keeps no state of its own besides the previous
cumulative state that delta temporality needs; the OTel SDK side (``export/sdk.py``) and the
Prometheus side (``export/prometheus.py``) both build on it.

>>> builder = PointBuilder(boundaries=[0.01, 0.1, 1.0])
>>> metrics = builder.build(aggregator.view(), time.time_ns())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.export import Gauge as GaugeData
from opentelemetry.sdk.metrics.export import Histogram as HistogramData

from .._keys import ERROR_TYPE
from ..counters import CounterMetric, counter_value, counters_of
from . import spec as _spec
from .traces import EXEMPLARS, ExemplarStore

if TYPE_CHECKING:
    from ..aggregator import AggregateView, Series
    from ..histogram import Histogram

__all__ = [
    "AGGREGATIONS",
    "DROP_REASON",
    "EXPORTS_FAILED",
    "INFERENCE_ABANDONED",
    "INFERENCE_CPU_TIME",
    "INFERENCE_DURATION",
    "KEYS_OVERFLOWED",
    "RECORDS_DROPPED",
    "SCOPE_NAME",
    "SDK_ERRORS",
    "SPANS_DROPPED",
    "STAGE_CPU_TIME",
    "STAGE_DURATION",
    "STAGE_GPU_TIME",
    "PointBuilder",
    "series_counters",
    "signal_metrics",
]

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
