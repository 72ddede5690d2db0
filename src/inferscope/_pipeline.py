"""Lifecycle: the drainer thread, the export pipeline, ``configure()``, ``shutdown()`` and fork.

Everything here runs off the hot path. The runtime and registry (``_runtime.py``) live for the whole
process; ``configure()`` rebuilds what hangs off them and keeps the aggregates and keys.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import tracemalloc
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from ._backend import BACKEND
from ._backend import monotonic_ns as _monotonic_ns
from ._records import (
    COUNTER_CUDA_MEMORY,
    COUNTER_PY_HEAP,
    DROP_AGGREGATION_FAILED,
    DROP_GPU_TIMING_BACKLOG,
    DROP_RING_FULL,
    DROP_STACK_DEPTH,
    empty_records,
)
from ._runtime import REGISTRY, RUNTIME
from .aggregate import AggregateView, Aggregator, Snapshot, build_snapshot
from .config import TRACE_SAMPLERS, ConfigError, Settings, load_settings
from .counters import counter_metrics
from .counters.cuda import DEVICE_TIMER, install_cuda_reader
from .export.metrics import (
    AggregatesExporter,
    PrometheusCollector,
    PrometheusServer,
    export_empty_collections,
    start_prometheus_server,
    unwrap_meter_provider,
    wrap_meter_provider,
)
from .export.traces import (
    EXEMPLARS,
    SLOW_QUANTILES,
    TracePipeline,
    TracePolicy,
    install_runtime_context,
    uninstall_runtime_context,
)
from .system import check_oversubscription, install_import_hook, register_system_metrics, resource_attributes

_logger = logging.getLogger("inferscope")

#: How often the drainer looks at the ring's fill level between full drains.
_POLL_MILLIS = 10
_DRAIN_BATCH = 16384
#: shutdown() at interpreter exit waits at most this long for exporters.
_EXIT_TIMEOUT_MILLIS = 5000

AGGREGATOR = Aggregator(REGISTRY)


class Drainer:
    """Moves records from the ring into the aggregator: every ``interval_millis`` from a daemon
    thread, sooner when the ring is half full, and on demand (``drain()``) before any read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = empty_records(_DRAIN_BATCH)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._retired_ring_drops = 0
        self._unaggregated = 0
        self.interval_millis = 100
        self.errors = 0
        #: Where traced records go after aggregation, while tracing is on.
        self.traces: TracePipeline | None = None

    def drain(self) -> int:
        """Drain everything queued now; returns the number of records aggregated."""
        with self._lock:
            # Device times first: the spans of the stages drained next can then carry theirs.
            self._collect_device_times()
            total = self._drain_into_aggregator(RUNTIME.ring)
            self._publish_counts(RUNTIME.ring)
        return total

    def _collect_device_times(self) -> None:
        if not len(DEVICE_TIMER):
            return
        try:
            keys, seconds, span_ids = DEVICE_TIMER.collect()
            AGGREGATOR.add_gpu_times(np.array(keys, np.uint32), np.array(seconds, np.float64))
            traces = self.traces
            if traces is not None:
                traces.add_device_times(span_ids, seconds)
        except Exception:
            self.errors += 1
            _log_once_a_minute("inferscope: reading the device times of CUDA stages failed")

    def retire_ring(self, old_ring: Any) -> None:
        """Drain a ring that the runtime no longer writes to, and keep its drop count."""
        with self._lock:
            self._drain_into_aggregator(old_ring)
            self._retired_ring_drops += old_ring.dropped
            self._publish_counts(RUNTIME.ring)

    def _drain_into_aggregator(self, ring: Any) -> int:
        # Caller holds self._lock: the ring has a single consumer.
        total = 0
        with _short_switch_interval():
            while True:
                n = ring.drain(self._buffer)
                if n:
                    try:
                        AGGREGATOR.add(self._buffer[:n])
                        total += n
                    except Exception:
                        # The batch is out of the ring already: count it, never lose it silently.
                        self._unaggregated += n
                        self.errors += 1
                        _log_once_a_minute("inferscope: aggregating a batch of records failed")
                    traces = self.traces
                    if traces is not None:
                        try:
                            traces.add(self._buffer[:n])
                        except Exception:
                            self.errors += 1
                            _log_once_a_minute("inferscope: building spans from a batch of records failed")
                if n < len(self._buffer):
                    return total

    def _publish_counts(self, ring: Any) -> None:
        AGGREGATOR.set_dropped(DROP_RING_FULL, self._retired_ring_drops + ring.dropped)
        AGGREGATOR.set_dropped(DROP_STACK_DEPTH, RUNTIME.depth_dropped)
        if self._unaggregated:
            AGGREGATOR.set_dropped(DROP_AGGREGATION_FAILED, self._unaggregated)
        if DEVICE_TIMER.dropped:
            AGGREGATOR.set_dropped(DROP_GPU_TIMING_BACKLOG, DEVICE_TIMER.dropped)
        if self.traces is not None:
            AGGREGATOR.set_spans_dropped(self.traces.spans_dropped)
        AGGREGATOR.set_internal_errors(RUNTIME.internal_errors + self.errors + DEVICE_TIMER.errors)

    def start(self, interval_millis: int) -> None:
        self.stop()
        self.interval_millis = interval_millis
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="inferscope-drainer", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_millis: float = 5000) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_millis / 1e3)

    def _run(self, stop: threading.Event) -> None:
        next_due = time.monotonic() + self.interval_millis / 1e3
        poll = min(_POLL_MILLIS, self.interval_millis) / 1e3
        while not stop.wait(poll):
            ring = RUNTIME.ring
            if time.monotonic() < next_due and len(ring) < ring.capacity // 2:
                continue
            next_due = time.monotonic() + self.interval_millis / 1e3
            try:
                self.drain()
            except Exception:
                self.errors += 1
                _log_once_a_minute("inferscope: draining the ring failed")

    def after_fork_in_child(self) -> None:
        # Only the forking thread survives fork(): the lock may be held by a thread that is gone.
        self._lock = threading.Lock()
        self._retired_ring_drops = 0
        self._unaggregated = 0
        self.errors = 0
        self.traces = None
        self._thread = None
        self._stop = threading.Event()


_last_logged = 0.0


def _log_once_a_minute(message: str) -> None:
    global _last_logged
    now = time.monotonic()
    if now - _last_logged >= 60:
        _last_logged = now
        _logger.error(message, exc_info=True)


#: The GIL switch interval while the drainer aggregates (the default is 5 ms).
_DRAIN_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def _short_switch_interval() -> Iterator[None]:
    """Lower the GIL switch interval while aggregating, then restore it.

    numpy releases the GIL inside its larger operations. A serving thread that runs Python code
    without pause takes it each time and keeps it for a whole switch interval (5 ms) before the
    drainer can ask for it back; one aggregation of 16k records then takes ~100 ms instead of
    ~0.7 ms, and at ~1 M records/s the ring overflows. With a 0.5 ms interval the drainer keeps up,
    and the serving thread loses under 5% while a drain runs. The interval is restored unless
    the application changed it meanwhile.
    """
    previous = sys.getswitchinterval()
    if previous <= _DRAIN_SWITCH_INTERVAL_S:
        yield
        return
    sys.setswitchinterval(_DRAIN_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        if abs(sys.getswitchinterval() - _DRAIN_SWITCH_INTERVAL_S) < 1e-7:
            sys.setswitchinterval(previous)


DRAINER = Drainer()


def collect_view() -> AggregateView:
    """Drain the ring, then return the aggregates: what every exporter and reader sees."""
    DRAINER.drain()
    return AGGREGATOR.view()


class Exports:
    """The export side built from one ``Settings``: our MeterProvider, a wrapped user provider,
    and the Prometheus endpoint."""

    def __init__(
        self, settings: Settings, *, serve_prometheus: bool = True, resource: Resource | None = None
    ) -> None:
        self.settings = settings
        self.resource = resource if resource is not None else _resource(settings)
        self.own_wrappers: list[AggregatesExporter] = []
        self.meter_provider: MeterProvider | None = None
        self.user_provider: Any = settings.meter_provider
        self.prometheus: PrometheusServer | None = None
        self.traces: TracePipeline | None = None
        self._own_span_processor: Any = None
        histogram = {
            "aggregation": settings.histogram_aggregation,
            "boundaries": settings.histogram_boundaries,
            "max_buckets": settings.histogram_max_buckets,
            "counters": counter_metrics(settings.counter_mask),
        }
        ours = [_make_exporter(name, settings) for name in settings.metrics_exporters if name != "prometheus"]
        given: list[MetricExporter] = list(settings.metric_exporters)  # type: ignore[arg-type]
        if ours or given:
            readers = []
            for exporter in ours + given:
                wrapper = AggregatesExporter(
                    exporter,
                    collect_view,
                    resource=self.resource,
                    owns_delegate=all(exporter is not g for g in given),
                    **histogram,  # type: ignore[arg-type]
                )
                self.own_wrappers.append(wrapper)
                readers.append(
                    PeriodicExportingMetricReader(
                        wrapper,
                        export_interval_millis=settings.export_interval_millis,
                        export_timeout_millis=settings.export_timeout_millis,
                    )
                )
            # shutdown_on_exit=False: our own atexit hook drains the ring first, then shuts this down.
            self.meter_provider = MeterProvider(
                resource=self.resource, metric_readers=readers, shutdown_on_exit=False
            )
            for reader in readers:
                export_empty_collections(reader)
            register_system_metrics(self.meter_provider.get_meter("inferscope", _version()))
        provider: Any = self.user_provider
        if provider is not None:
            # Idempotent: after fork the child keeps the wrappers its parent installed.
            wrap_meter_provider(provider, collect_view, **histogram)  # type: ignore[arg-type]
            if provider not in _providers_with_system_metrics:
                # Observable instruments live as long as their provider: register them once.
                _providers_with_system_metrics.add(provider)
                register_system_metrics(provider.get_meter("inferscope", _version()))
        if serve_prometheus and "prometheus" in settings.metrics_exporters:
            collector = PrometheusCollector(
                collect_view, settings.histogram_boundaries, counters=counter_metrics(settings.counter_mask)
            )
            self.prometheus = start_prometheus_server(
                collector, settings.prometheus_host, settings.prometheus_port
            )
            _logger.info(
                "inferscope: serving Prometheus metrics on http://%s:%d/metrics",
                self.prometheus.host,
                self.prometheus.port,
            )
        if settings.tracing:
            self.traces = self._start_tracing(settings)

    def _start_tracing(self, settings: Settings) -> TracePipeline | None:
        """Span processors for our exporters (or the application's TracerProvider), the OTel context
        hook, and the hot path's trace linkage."""
        from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        hooks = install_runtime_context(RUNTIME.current_span)
        if hooks is None:
            return None
        processor = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        exporters = [_make_span_exporter(name, settings) for name in settings.traces_exporters]
        exporters += list(settings.span_exporters)  # type: ignore[arg-type]
        for exporter in exporters:
            processor.add_span_processor(BatchSpanProcessor(exporter))
        self._own_span_processor = processor
        resource = self.resource
        provider: Any = settings.tracer_provider
        if provider is not None:
            # The application's processors and Resource: our spans travel with its own.
            processor.add_span_processor(provider._active_span_processor)
            resource = provider.resource
        var, span_key = hooks
        policy = _trace_policy(settings)
        RUNTIME.set_tracing(var, span_key, policy.ratio_bound, policy.parent_based)
        return TracePipeline(
            registry=REGISTRY,
            processor=processor,
            resource=resource,
            policy=policy,
            quantiles=AGGREGATOR.duration_quantiles,
            monotonic_ns=_monotonic_ns,
            counters=counter_metrics(settings.counter_mask),
            scope_version=_version(),
        )

    def shutdown(self, timeout_millis: float) -> None:
        deadline = time.monotonic() + timeout_millis / 1e3

        def left() -> float:
            return max(0.0, (deadline - time.monotonic()) * 1e3)

        if self.meter_provider is not None:
            try:
                # The readers' final collection exports everything aggregated so far.
                self.meter_provider.shutdown(timeout_millis=left())
            except Exception:
                _logger.warning("inferscope: shutting down the metric exporters failed", exc_info=True)
        if self.user_provider is not None:
            try:
                self.user_provider.force_flush(timeout_millis=left())
            except Exception:
                _logger.warning("inferscope: flushing the application's MeterProvider failed", exc_info=True)
            unwrap_meter_provider(self.user_provider)
        if self.prometheus is not None:
            self.prometheus.shutdown(timeout_millis=left())
        self.stop_tracing(left())

    def stop_tracing(self, timeout_millis: float) -> None:
        """Stop giving entries span ids, then flush the spans built so far. Our own processors are
        shut down; the application's TracerProvider is only flushed: it is the application's."""
        if self.traces is None:
            return
        RUNTIME.set_tracing(None)
        uninstall_runtime_context()
        traces, self.traces = self.traces, None
        try:
            traces.force_flush(int(timeout_millis))
            for processor in self._own_span_processor._span_processors:
                if processor is not getattr(self.settings.tracer_provider, "_active_span_processor", None):
                    processor.shutdown()
        except Exception:
            _logger.warning("inferscope: flushing spans failed", exc_info=True)

    def detach_after_fork(self) -> None:
        """In a forked child: stop contributing to the parent's exporters and endpoint.

        The SDK restarts its reader threads in the child; our wrappers then add nothing and skip
        their delegate, so the parent's connections are never used from the child. A user's own
        MeterProvider keeps exporting the child's data, since the application owns it.
        """
        for wrapper in self.own_wrappers:
            wrapper.active = False
        self.prometheus = None  # the parent's socket and thread; not ours to close


def _resource(settings: Settings) -> Resource:
    attributes: dict[str, Any] = {
        "service.instance.id": str(uuid.uuid4()),
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    if settings.service_name is not None:
        attributes["service.name"] = settings.service_name
    # The environment fingerprint and key versions: what changed when the tax crept in.
    attributes.update(resource_attributes())
    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; explicit settings win.
    return Resource.create(attributes)


def _version() -> str:
    from . import __version__

    return __version__


def _make_exporter(name: str, settings: Settings) -> MetricExporter:
    if name == "console":
        return ConsoleMetricExporter()
    if name != "otlp":
        raise ConfigError("metrics_exporters", name, "otlp, console, prometheus")
    timeout_s = settings.export_timeout_millis / 1e3
    if settings.otlp_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        endpoint = settings.otlp_endpoint
        if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/metrics"):
            endpoint = endpoint.rstrip("/") + "/v1/metrics"
        return HttpExporter(endpoint=endpoint, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    endpoint = settings.otlp_endpoint
    insecure = None if endpoint is None else endpoint.startswith("http://")
    return GrpcExporter(endpoint=endpoint, insecure=insecure, timeout=timeout_s)


def _make_span_exporter(name: str, settings: Settings) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    timeout_s = settings.export_timeout_millis / 1e3
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or "").strip() or settings.otlp_protocol
    endpoint = settings.otlp_endpoint
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    insecure = None if endpoint is None else endpoint.startswith("http://")
    return GrpcExporter(endpoint=endpoint, insecure=insecure, timeout=timeout_s)


def _trace_policy(settings: Settings) -> TracePolicy:
    parent_based, fixed_ratio = TRACE_SAMPLERS[settings.trace_sampler]
    slow = settings.trace_slow_ms
    return TracePolicy(
        ratio=settings.trace_ratio if fixed_ratio is None else fixed_ratio,
        parent_based=parent_based,
        slow_seconds=slow / 1e3 if isinstance(slow, float) else None,
        slow_quantile=SLOW_QUANTILES.get(slow) if isinstance(slow, str) else None,
        errors=settings.trace_errors,
        max_spans_per_second=settings.trace_max_spans_per_second,
    )


def _traced_bytes() -> int:
    return tracemalloc.get_traced_memory()[0]


_providers_with_system_metrics: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.RLock()
_settings: Settings | None = None
_exports: Exports | None = None


def configure(**settings: Any) -> Settings:
    """Configure inferscope; optional, since environment variables work alone.

    Idempotent and safe to call again: the pipeline is rebuilt from the new settings while
    aggregates and keys are kept. Raises ``ConfigError`` naming any invalid setting, the value it
    got and what it accepts; then nothing changes.

    >>> import inferscope
    >>> inferscope.configure(counters="minimal", metrics_exporters=["prometheus"])  # doctest: +SKIP
    """
    new = load_settings(settings)
    with _lock:
        _apply(new)
    return new


def _apply(settings: Settings) -> None:
    global _settings, _exports
    previous, _exports = _exports, None
    DRAINER.stop()
    if previous is not None:
        DRAINER.drain()
        DRAINER.traces = None
        previous.shutdown(settings.export_timeout_millis)
    REGISTRY.max_keys = settings.max_keys
    if settings.counter_mask & COUNTER_PY_HEAP:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        RUNTIME.heap_reader = _traced_bytes
    else:
        RUNTIME.heap_reader = None
    install_cuda_reader(RUNTIME, bool(settings.counter_mask & COUNTER_CUDA_MEMORY))
    RUNTIME.counters = settings.counter_mask
    if RUNTIME.ring.capacity != settings.ring_capacity:
        from ._backend import Ring

        old_ring = RUNTIME.ring
        RUNTIME.ring = Ring(settings.ring_capacity)
        DRAINER.retire_ring(old_ring)
    _settings = settings
    RUNTIME.enabled = settings.enabled
    if not settings.enabled:
        return
    # Threads of torch, BLAS and OpenMP beyond the CPUs this process may use: warn once, now and
    # whenever one of those libraries is imported later.
    check_oversubscription()
    install_import_hook()
    _exports = Exports(settings)
    DRAINER.traces = _exports.traces
    DRAINER.start(settings.drain_interval_millis)


def shutdown(timeout_millis: float = 30_000) -> None:
    """Flush everything recorded so far to every exporter, then stop. Also runs at exit.

    Calls made after ``shutdown()`` are passed straight through, unrecorded, until the next
    ``configure()``. Never raises; a backend that is down costs at most ``timeout_millis``.
    """
    global _exports
    with _lock:
        try:
            DRAINER.stop(timeout_millis)
            RUNTIME.enabled = False
            # Stages on CUDA whose work is still running: their device time is recorded too.
            DEVICE_TIMER.wait(min(timeout_millis / 1e3, 2.0))
            DRAINER.drain()
            exports, _exports = _exports, None
            DRAINER.traces = None
            if exports is not None:
                exports.shutdown(timeout_millis)
        except Exception:
            _logger.error("inferscope: shutdown failed", exc_info=True)


def snapshot() -> Snapshot:
    """Per model and per stage: count, errors, p50/p90/p95/p99, max, mean, CPU time and CPU/wall.

    >>> import inferscope
    >>> snap = inferscope.snapshot()
    >>> isinstance(snap.table(), str)
    True
    """
    mask = _settings.counter_mask if _settings is not None else 0
    return build_snapshot(collect_view(), BACKEND, counter_metrics(mask))


def current_settings() -> Settings | None:
    """The settings in force, or None before the first (automatic or explicit) configuration."""
    return _settings


def prometheus_port() -> int | None:
    """The port the Prometheus endpoint is bound to, if one is being served."""
    exports = _exports
    return exports.prometheus.port if exports is not None and exports.prometheus is not None else None


def _after_fork_in_child() -> None:
    RUNTIME.after_fork_in_child()
    AGGREGATOR.after_fork_in_child()
    DRAINER.after_fork_in_child()
    global _lock, _exports
    _lock = threading.RLock()
    settings, exports = _settings, _exports
    if settings is None or not settings.enabled:
        return
    try:
        # Rebuilt here, in the forking thread, while no other thread of this process exists yet:
        # a thread started from a fork handler would race the handlers that run after this one
        # (concurrent.futures, for one, resets its locks there). The child keeps the parent's
        # resource with its own process.pid and service.instance.id, so building it needs no
        # resource detectors. The parent owns the Prometheus port: a child serves none unless
        # configure() asks.
        resource = None
        if exports is not None:
            exports.detach_after_fork()
            resource = exports.resource.merge(
                Resource({"process.pid": os.getpid(), "service.instance.id": str(uuid.uuid4())})
            )
        EXEMPLARS.clear()  # the parent's spans; the child exports its own
        _exports = Exports(settings, serve_prometheus=False, resource=resource)
        DRAINER.traces = _exports.traces
    except Exception:
        _exports = None
        _logger.error("inferscope: rebuilding exporters after fork failed", exc_info=True)
    DRAINER.start(settings.drain_interval_millis)


def autoconfigure() -> None:
    """Configure from the environment at import. Never raises: an invalid variable is logged at
    ERROR and inferscope stays off (calls pass straight through) until configure() succeeds."""
    try:
        settings = load_settings({})
        if settings.enabled and "opentelemetry.instrumentation.auto_instrumentation" in sys.modules:
            # Loaded by opentelemetry-instrument, after its configurator set up the SDK: join the
            # SDK's MeterProvider from the start instead of building exporters of our own.
            from .otel_distro import sdk_overrides

            overrides = sdk_overrides(settings)
            if overrides:
                settings = load_settings(overrides)
    except ConfigError as exc:
        RUNTIME.enabled = False
        _logger.error("inferscope is disabled: %s", exc)
        return
    try:
        with _lock:
            _apply(settings)
    except Exception:
        RUNTIME.enabled = False
        _logger.error("inferscope is disabled: starting it failed", exc_info=True)


def reset_aggregates() -> None:
    """Drain the ring and forget every aggregate (keys stay). For tests: each starts from zero."""
    DRAINER.drain()
    AGGREGATOR.reset()
    EXEMPLARS.clear()


def _shutdown_at_exit() -> None:
    shutdown(_EXIT_TIMEOUT_MILLIS)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
