"""inferscope's points inside the OpenTelemetry SDK: the exporter, reader and MeterProvider wrapping.

OTel SDK 1.45 has no MetricProducer, so pre-aggregated points (built by ``export/points.py``) reach
an OTLP (or any other) exporter through :class:`AggregatesExporter`, a ``MetricExporter`` that
appends inferscope's points to every batch the SDK hands it and then delegates. A reader without
an exporter of its own gets them through its collect callback; :func:`wrap_meter_provider` joins
every reader of an application's ``MeterProvider`` and :func:`unwrap_meter_provider` undoes it.
This module owns the registry of wrapped readers, its lock, and the fork hook that resets them.

Example::

    reader = PeriodicExportingMetricReader(
        AggregatesExporter(OTLPMetricExporter(), aggregator.view, resource=resource, boundaries=BOUNDS)
    )
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    export_empty_collections(reader)  # export even though the provider has no instruments of its own
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import _otel_compat
from .._selflog import RateLimitedLog, exporter_log
from ..config import ConfigError
from ..counters import CounterMetric
from .points import (
    EXPORTS_FAILED,
    SCOPE_NAME,
    PointBuilder,
    _provided_signals,
    _scope_version,
    signal_metrics,
)

if TYPE_CHECKING:
    from ..aggregator import AggregateView

__all__ = [
    "AggregatesExporter",
    "export_empty_collections",
    "unwrap_meter_provider",
    "wrap_meter_provider",
]

_logger = logging.getLogger("inferscope")


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
