"""``opentelemetry-instrument`` integration: inferscope joins the SDK pipeline that the stock
opentelemetry-distro (or any other distro and configurator) set up, instead of replacing it.

``opentelemetry-instrument`` runs, in order: the distro (the stock one sets
``OTEL_{TRACES,METRICS,LOGS}_EXPORTER=otlp`` defaults), one configurator (the stock one builds the
SDK's TracerProvider, MeterProvider and LoggerProvider from ``OTEL_*`` and sets them globally), the
``opentelemetry_pre_instrument`` hooks, the instrumentors, then the ``opentelemetry_post_instrument``
hooks. Only one distro and one configurator are loaded, so inferscope registers neither: it
registers the two hooks below, and composes with whatever was configured.

Importing inferscope configures it from ``OTEL_*`` and ``INFERSCOPE_*`` at once (``autoconfigure``).
The pre-instrument hook then looks at the global MeterProvider:

- An SDK ``TracerProvider`` with span processors: inferscope's spans go through them, with the
  SDK's Resource, instead of through exporters of its own (``tracer_provider=provider``). Unless a
  sampler is named, it keeps the slow and failed inferences and ``trace_ratio`` of the others
  (``ZERO_CODE_TRACE_SAMPLER``), not every one under the SDK's always-sampled server spans.
- An SDK ``MeterProvider`` with a push reader (OTLP, console): inferscope is reconfigured with
  ``meter_provider=provider`` and without its own push exporters, so its pre-aggregated points ride
  on the SDK's readers and exporters, under the SDK's Resource, exactly once. ``prometheus``, if
  asked for, is kept: it is a pull endpoint of inferscope's own that no SDK reader replaces.
- Otherwise (``OTEL_METRICS_EXPORTER=none``, no configurator, a pull-only reader): inferscope keeps
  the exporters it configured from the environment.
- An invalid ``INFERSCOPE_*``/``OTEL_*`` value was already logged at ERROR, with the ConfigError's
  message, by the import; inferscope stays off and the service runs uninstrumented.

The pipeline that the import built is retired without a final export (it has recorded nothing
yet, and the aggregates carry over), so nothing goes out twice or under a second Resource. The
post-instrument hook repeats the check, for a distro that sets its MeterProvider late. Neither hook
ever raises.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from . import _otel_compat, _pipeline
from .config import TRACE_SAMPLERS, ConfigError, Settings, load_settings

__all__ = [
    "ZERO_CODE_TRACE_SAMPLER",
    "attach_to_sdk",
    "own_traces_off",
    "post_instrument",
    "pre_instrument",
    "sdk_overrides",
    "trace_sampler_chosen",
]

_logger = logging.getLogger("inferscope")

#: inferscope's own exporters that a push reader of the SDK replaces.
_PUSH_EXPORTERS = frozenset({"otlp", "console"})
#: Nothing has been recorded when the hooks run; stopping is quick.
_SHUTDOWN_TIMEOUT_MILLIS = 1000
#: What inferscope keeps on the SDK's TracerProvider when no sampler is named. The SDK's default,
#: parentbased_always_on, samples every server span, and following it would make every inference
#: and each of its stages a span (several per request, built in the serving process). So, unless a
#: sampler is named, inferscope keeps the slow and failed inferences plus trace_ratio of the rest,
#: picked by trace id (the same requests in every process); docs/tracing.md.
ZERO_CODE_TRACE_SAMPLER = "traceidratio"


def pre_instrument() -> None:
    """The ``opentelemetry_pre_instrument`` entry point: join the SDK's MeterProvider, if any."""
    attach_to_sdk()


def post_instrument() -> None:
    """The ``opentelemetry_post_instrument`` entry point: join a MeterProvider set up late."""
    attach_to_sdk()


def attach_to_sdk() -> str:
    """Make inferscope export through the global SDK MeterProvider when it has a push reader.

    Returns what happened, for logs and tests: ``"attached"``, ``"already attached"``, ``"own
    exporters"`` (no usable SDK MeterProvider: inferscope keeps its own, from the environment),
    ``"disabled"`` (inferscope is off, e.g. after a ConfigError) or ``"failed"``. Never raises.
    """
    try:
        return _attach()
    except ConfigError as exc:
        # Validated before anything changed; as at import, an invalid setting turns inferscope off.
        _logger.error("inferscope is disabled: %s", exc)
        _pipeline.shutdown(_SHUTDOWN_TIMEOUT_MILLIS)
        return "disabled"
    except Exception:
        _logger.error(
            "inferscope: joining the OpenTelemetry SDK's MeterProvider failed; "
            "using inferscope's own exporters from the environment",
            exc_info=True,
        )
        try:
            _pipeline.configure()
        except Exception:
            _logger.error("inferscope: configuring from the environment failed", exc_info=True)
        return "failed"


def _attach() -> str:
    settings = _pipeline.current_settings()
    if settings is None or not settings.enabled:
        # None: the environment held an invalid value; autoconfigure logged it at ERROR already.
        return "disabled"
    provider = _sdk_meter_provider()
    tracer_provider = None if own_traces_off() else _sdk_tracer_provider()
    if provider is None and tracer_provider is None:
        return "own exporters"
    if (provider is None or settings.meter_provider is provider) and (
        tracer_provider is None or settings.tracer_provider is tracer_provider
    ):
        return "already attached"
    overrides = sdk_overrides(settings, provider, tracer_provider)
    load_settings(overrides)  # raises ConfigError before anything changes
    _silence_own_push_exporters()
    _pipeline.configure(**overrides)
    _logger.debug("inferscope: exporting through the OpenTelemetry SDK's MeterProvider")
    return "attached"


def sdk_overrides(settings: Settings, provider: Any = None, tracer_provider: Any = None) -> dict[str, Any]:
    """The ``configure()`` arguments that put inferscope on the SDK's MeterProvider and
    TracerProvider (the global ones unless given), starting from ``settings``; empty when there is
    no usable provider."""
    overrides: dict[str, Any] = {}
    provider = provider if provider is not None else _sdk_meter_provider()
    if provider is not None:
        exporters = tuple(name for name in settings.metrics_exporters if name not in _PUSH_EXPORTERS)
        overrides.update(meter_provider=provider, metrics_exporters=exporters)
    tracer_provider = tracer_provider if tracer_provider is not None else _sdk_tracer_provider()
    if tracer_provider is not None and not own_traces_off():
        # Spans go through the application's span processors, so not through exporters of ours too.
        overrides.update(tracer_provider=tracer_provider, traces_exporters=())
        if not trace_sampler_chosen():
            overrides.update(trace_sampler=ZERO_CODE_TRACE_SAMPLER)
    return overrides


def trace_sampler_chosen() -> bool:
    """Whether the environment names a sampler inferscope follows (``INFERSCOPE_TRACE_SAMPLER``,
    or an ``OTEL_TRACES_SAMPLER`` it knows)."""
    if (os.environ.get("INFERSCOPE_TRACE_SAMPLER") or "").strip():
        return True
    return (os.environ.get("OTEL_TRACES_SAMPLER") or "").strip().lower() in TRACE_SAMPLERS


def own_traces_off() -> bool:
    """``INFERSCOPE_TRACES_EXPORTER=none``: inferscope keeps no spans, even where the application's
    SDK exports its own (``OTEL_TRACES_EXPORTER`` then applies to the SDK's spans only)."""
    return (os.environ.get("INFERSCOPE_TRACES_EXPORTER") or "").strip().lower() == "none"


def _sdk_tracer_provider() -> Any:
    """The global TracerProvider if it is an SDK one with at least one span processor."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import get_tracer_provider

    provider = get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    if not _otel_compat.span_processors(_otel_compat.active_span_processor(provider)):
        return None  # OTEL_TRACES_EXPORTER=none: nothing would receive our spans
    return provider


def _sdk_meter_provider() -> Any:
    """The global MeterProvider if it is an SDK one with at least one push (periodic) reader."""
    from opentelemetry.metrics import get_meter_provider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    provider = get_meter_provider()
    if not isinstance(provider, MeterProvider):
        return None
    readers = _otel_compat.provider_readers(provider)
    if not any(isinstance(reader, PeriodicExportingMetricReader) for reader in readers):
        return None
    return provider


def _silence_own_push_exporters() -> None:
    """Keep the pipeline built at import from sending anything when it is replaced.

    Replacing a pipeline shuts its readers down, and their final collection exports. Here the
    application has not run yet and the aggregates carry over to the new pipeline, so that export
    could only send a second copy of inferscope's metrics under inferscope's own Resource. So each
    of our exporters stops adding points (``active``) and its delegate is swapped for a stand-in
    that sends nothing and shuts the real exporter down.
    """
    exports = _pipeline._exports
    if exports is None:
        return
    for wrapper in exports.own_wrappers:
        wrapper.active = False
        wrapper.delegate = _Retired(wrapper.delegate)


class _Retired(MetricExporter):
    """An exporter being retired: exports nothing; shutting down shuts the real one down."""

    def __init__(self, exporter: MetricExporter) -> None:
        temporality, aggregation = _otel_compat.exporter_preferences(exporter)
        super().__init__(preferred_temporality=temporality, preferred_aggregation=aggregation)
        self._exporter = exporter

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._exporter.shutdown(timeout_millis=timeout_millis, **kwargs)
