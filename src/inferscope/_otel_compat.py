"""Every access to a private attribute of the OpenTelemetry SDK and API, in one module.

The SDK (1.45) has no MetricProducer, no public list of a provider's readers and no public way to
join a TracerProvider's span processors or to follow its runtime context, so inferscope reaches into
a few private attributes. They live here and nowhere else, so that a new SDK release breaks one
module, which ``tests/test_otel_compat.py`` checks against the installed SDK, and
``constraints/otel.txt`` pins the versions the suite is tested with.

Every getter tolerates a missing attribute (it returns None or nothing), and the callers log, once
per process, what could not be done (:func:`warn_once`), instead of raising into the application.

Example::

    missing = missing_attributes()  # [] on a supported SDK
    readers = provider_readers(meter_provider)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as _otel_context
from opentelemetry.context.context import _RuntimeContext
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace.propagation import _SPAN_KEY

__all__ = [
    "GRPC_RECONNECT",
    "PRIVATE_ATTRIBUTES",
    "SPAN_KEY",
    "RuntimeContextBase",
    "active_span_processor",
    "exporter_preferences",
    "gate_grpc_exporter",
    "missing_attributes",
    "provider_readers",
    "provider_resource",
    "reader_collect",
    "reader_exporter",
    "reader_temporality",
    "runtime_context",
    "runtime_context_var",
    "set_reader_collect",
    "set_reader_exporter",
    "set_runtime_context",
    "span_processors",
    "warn_once",
]

_logger = logging.getLogger("inferscope")

#: (where, attribute, what inferscope needs it for): the private attributes this module reads.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("MeterProvider", "_sdk_config", "the Resource of an application's MeterProvider"),
    ("MeterProvider", "_metric_readers", "the readers an application's MeterProvider was built with"),
    ("MeterProvider", "_measurement_consumer", "the readers added later with add_metric_reader()"),
    ("SynchronousMeasurementConsumer", "_reader_storages", "the same"),
    ("MetricReader", "_collect", "adding inferscope's points to any reader's collection"),
    ("MetricReader", "_instrument_class_temporality", "the temporality a reader asks for"),
    ("PeriodicExportingMetricReader", "_exporter", "counting a push reader's failed exports"),
    ("MetricExporter", "_preferred_temporality", "answering a reader as the wrapped exporter would"),
    ("MetricExporter", "_preferred_aggregation", "the same"),
    ("TracerProvider", "_active_span_processor", "sending inferscope's spans through the app's processors"),
    ("SynchronousMultiSpanProcessor", "_span_processors", "telling an SDK with no span exporter"),
    ("OTLP gRPC exporter", "_client", "holding OTLP/gRPC exports off while the process forks"),
    ("OTLP gRPC exporter", "_channel", "the same"),
    (
        "OTLP gRPC exporter",
        "_initialize_channel_and_stub",
        "the same, for the channel made after UNAVAILABLE",
    ),
    ("opentelemetry.context", "_RUNTIME_CONTEXT", "linking entries to the current span on the hot path"),
    ("ContextVarsRuntimeContext", "_current_context", "the ContextVar the hot path reads"),
)

#: The base class of OTel runtime contexts (private in the API), and the context key of the current span.
RuntimeContextBase = _RuntimeContext
SPAN_KEY: str = _SPAN_KEY

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _warned_lock
    _warned_lock = threading.Lock()  # a thread that held it at fork() is gone in the child


os.register_at_fork(after_in_child=_after_fork_in_child)


def warn_once(what: str, attribute: str) -> None:
    """Log, once per process and ``what``, that the installed OpenTelemetry lacks ``attribute``."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    _logger.warning(
        "inferscope: %s is not possible with the installed OpenTelemetry SDK: it has no %s "
        "(inferscope is tested with the versions in constraints/otel.txt)",
        what,
        attribute,
    )


# --- metrics ----------------------------------------------------------------------------------------


def provider_resource(provider: MeterProvider) -> Resource | None:
    """The Resource a MeterProvider was built with, or None when the SDK hides it elsewhere."""
    resource = getattr(getattr(provider, "_sdk_config", None), "resource", None)
    return resource if isinstance(resource, Resource) else None


def provider_readers(provider: MeterProvider) -> list[MetricReader]:
    """The readers of ``provider``: those passed to the constructor and those added later."""
    found: list[MetricReader] = list(getattr(provider, "_metric_readers", ()))
    consumer = getattr(provider, "_measurement_consumer", None)
    found += list(getattr(consumer, "_reader_storages", {}))
    unique: dict[int, MetricReader] = {}
    for reader in found:
        unique.setdefault(id(reader), reader)
    return list(unique.values())


def reader_exporter(reader: MetricReader) -> Any:
    """The exporter of a push reader, or None."""
    return getattr(reader, "_exporter", None)


def set_reader_exporter(reader: MetricReader, exporter: Any) -> None:
    reader._exporter = exporter  # type: ignore[attr-defined]


def has_collect(reader: MetricReader) -> bool:
    """Whether ``reader`` keeps its collect callback where :func:`reader_collect` finds it."""
    return hasattr(reader, "_collect")


def reader_collect(reader: MetricReader) -> Callable[..., Any] | None:
    """The callback a reader's ``collect()`` calls (set when it is registered with a provider)."""
    collect: Callable[..., Any] | None = getattr(reader, "_collect", None)
    return collect


def set_reader_collect(reader: MetricReader, collect: Callable[..., Any] | None) -> None:
    reader._collect = collect  # type: ignore[assignment]


def reader_temporality(reader: MetricReader, instrument_class: type) -> AggregationTemporality:
    """The temporality ``reader`` asks for ``instrument_class`` (cumulative when it does not say)."""
    preferred = getattr(reader, "_instrument_class_temporality", None) or {}
    # Keyed by the SDK's internal classes (_Histogram), subclasses of the public ones.
    for cls, temporality in preferred.items():
        if (
            isinstance(cls, type)
            and issubclass(cls, instrument_class)
            and isinstance(temporality, AggregationTemporality)
        ):
            return temporality
    return AggregationTemporality.CUMULATIVE


def exporter_preferences(exporter: Any) -> tuple[dict[type, Any] | None, dict[type, Any] | None]:
    """The temporality and aggregation a MetricExporter was built with, to pass on to a wrapper."""
    return getattr(exporter, "_preferred_temporality", None), getattr(
        exporter, "_preferred_aggregation", None
    )


#: The method of an OTLP gRPC exporter that makes its channel and stub again (after UNAVAILABLE).
GRPC_RECONNECT = "_initialize_channel_and_stub"


def gate_grpc_exporter(exporter: Any, wrap: Callable[[Any], Any]) -> None:
    """Replace the gRPC channel and stub of an OTLP gRPC exporter with ``wrap(each)``."""
    for name in ("_client", "_channel"):
        target = getattr(exporter, name, None)
        if target is None:
            warn_once("holding OTLP/gRPC exports off while the process forks", name)
            continue
        setattr(exporter, name, wrap(target))


# --- traces ----------------------------------------------------------------------------------------


def active_span_processor(tracer_provider: Any) -> Any:
    """The span processor a TracerProvider hands every span to, or None (logged once)."""
    processor = getattr(tracer_provider, "_active_span_processor", None)
    if processor is None and tracer_provider is not None:
        warn_once(
            "sending inferscope's spans through the application's TracerProvider", "_active_span_processor"
        )
    return processor


def span_processors(processor: Any) -> Sequence[Any]:
    """The processors inside a multi span processor (empty for anything else)."""
    found: Sequence[Any] = getattr(processor, "_span_processors", ())
    return found


def runtime_context() -> Any:
    """The OTel API's runtime context object, or None."""
    return getattr(_otel_context, "_RUNTIME_CONTEXT", None)


def set_runtime_context(runtime: Any) -> None:
    _otel_context._RUNTIME_CONTEXT = runtime  # type: ignore[attr-defined]


def runtime_context_var(runtime: Any) -> ContextVar[Any] | None:
    """The ContextVar behind a ``ContextVarsRuntimeContext``, or None."""
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, ContextVar) else None


# --- the check ------------------------------------------------------------------------------------


def missing_attributes() -> list[str]:
    """The private attributes above that the installed OpenTelemetry no longer has, as
    ``"Owner.attribute"``; empty on a supported SDK. Builds throwaway SDK objects, off the hot path."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider

    exporter = ConsoleMetricExporter()
    grpc_exporter = OTLPMetricExporter(endpoint="http://127.0.0.1:4317", insecure=True)
    push = PeriodicExportingMetricReader(exporter, export_interval_millis=float("inf"))
    pull = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[push, pull], shutdown_on_exit=False)
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    try:
        objects: dict[str, Any] = {
            "MeterProvider": provider,
            "SynchronousMeasurementConsumer": getattr(provider, "_measurement_consumer", None),
            "MetricReader": pull,
            "PeriodicExportingMetricReader": push,
            "MetricExporter": exporter,
            "TracerProvider": tracer_provider,
            "SynchronousMultiSpanProcessor": getattr(tracer_provider, "_active_span_processor", None),
            "opentelemetry.context": _otel_context,
            "ContextVarsRuntimeContext": ContextVarsRuntimeContext(),
            "OTLP gRPC exporter": grpc_exporter,
        }
        missing = [
            f"{owner}.{attribute}"
            for owner, attribute, _ in PRIVATE_ATTRIBUTES
            if objects[owner] is None or not hasattr(objects[owner], attribute)
        ]
        if not missing:
            if provider_resource(provider) is None:
                missing.append("MeterProvider._sdk_config.resource")
            if {id(r) for r in provider_readers(provider)} != {id(push), id(pull)}:
                missing.append("MeterProvider readers")
            if not callable(reader_collect(pull)):
                missing.append("MetricReader._collect (callable once registered)")
        return missing
    finally:
        provider.shutdown()
        tracer_provider.shutdown()
        grpc_exporter.shutdown()
