"""Lifecycle: the drainer thread, the export pipeline, ``configure()``, ``shutdown()`` and fork.

Everything here runs off the hot path. The runtime and registry (``_runtime.py``) live for the whole
process; ``configure()`` rebuilds what hangs off them and keeps the aggregates and keys.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import logging
import math
import os
import select
import socket
import sys
import threading
import time
import tracemalloc
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from . import _otel_compat
from ._backend import BACKEND
from ._backend import monotonic_ns as _monotonic_ns
from ._process_cpu import OWN_THREADS, NativeCpuSharer, ProcessCpuSharer
from ._records import (
    COUNTER_CUDA_MEMORY,
    COUNTER_PY_HEAP,
    DROP_AGGREGATION_FAILED,
    DROP_GPU_TIMING_BACKLOG,
    DROP_RING_FULL,
    DROP_STACK_DEPTH,
    RECORD_DTYPE,
    empty_records,
)
from ._runtime import REGISTRY, RUNTIME
from ._selflog import ERRORS, exporting_quietly, quiet_exporter_loggers, redact, report_error
from .aggregator import AggregateView, Aggregator, batch_fold_of_native
from .config import TRACE_SAMPLERS, ConfigError, Settings, load_settings
from .counters import counter_metrics
from .counters.cuda import DEVICE_TIMER, install_cuda_reader
from .detector import install as install_detector
from .export.grpc_fork import GRPC_CALLS, UnusableMetricExporter, UnusableSpanExporter, gated
from .export.multiworker import PUBLISHER, merged_collector
from .export.prometheus import PrometheusCollector, PrometheusServer, start_prometheus_server
from .export.sdk import (
    AggregatesExporter,
    export_empty_collections,
    unwrap_meter_provider,
    wrap_meter_provider,
)
from .export.traces import (
    DROP_DRAIN_BACKLOG,
    EXEMPLARS,
    SLOW_QUANTILES,
    BoundedBatchSpanProcessor,
    TracePipeline,
    TracePolicy,
    install_runtime_context,
    uninstall_runtime_context,
)
from .histogram import SCALE, _sub_bucket_tables
from .snapshots import Snapshot, build_snapshot
from .system import check_oversubscription, install_import_hook, register_system_metrics, resource_attributes
from .windows import WINDOWS

if TYPE_CHECKING:
    from ._native import Collector

_logger = logging.getLogger("inferscope")

_DRAIN_BATCH = 16384
#: shutdown() waits at most this long for exporters when nothing was configured.
_EXIT_TIMEOUT_MILLIS = 5000

AGGREGATOR = Aggregator(REGISTRY)
_T = TypeVar("_T")


#: How long a read waits for the native drainer's thread to finish folding, at most.
_COLLECT_TIMEOUT_MILLIS = 10_000
#: The native path's Python thread sleeps at most this long between two looks at its work.
_NATIVE_LONGEST_WAIT_S = 10.0


class Drainer:
    """Moves records from the ring into the aggregator: every ``interval_millis``, sooner when the
    ring is half full, and on demand (``drain()``) before any read.

    On the C backend the records never pass through Python. A thread of the extension
    (``_native.Collector``, see ``_native/collector.h``) drains the ring once per interval and
    whenever a producer finds it half full, folds the records into histograms and shares the
    process CPU out to inferences, without the GIL. Python takes that fold (draining the rest of the
    ring first, the GIL released) and merges it into the aggregator only when something reads:
    ``snapshot()``, an export, a window's close; and every interval while tracing is on, to build
    spans. The GIL is held for a few rows per read, never per record, and the switch interval is
    left alone. The Python thread wakes only when the canary, a window or those are due.

    The pure-Python backend's drainer is a Python thread that sleeps in ``poll()`` on a pipe that
    producers write to at half full, and folds with numpy every interval. Either way an idle
    process sees about one wake-up per interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None  # the pure-Python drain's buffer, made on first use
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: The pure-Python backend's wake-up pipe (read end, write end), made on the first start;
        #: never closed in the process that made it, so that a producer of a retired ring never
        #: writes to a reused fd.
        self._wake: tuple[int, int] | None = None
        #: Whether the native drainer is in use: the C backend's. (False runs the Python drain on the
        #: C backend too, as benchmarks/drainer_load.py does to compare the two.)
        self.native = BACKEND == "c"
        #: The native drainer, made on first use; nothing starts at import.
        self._collector: Collector | None = None
        self._collected = 0  # the collector's cumulative count of records folded, at the last take
        self._ticked = 0  # the same, at the Python thread's last tick
        self._native_counts = (0, 0, 0, 0, 0)  # the collector's (folded, failed, traced_dropped, ...)
        self._retired_ring_drops = 0
        self._unaggregated = 0
        self.interval_millis = 100
        #: Where traced records go after aggregation, while tracing is on.
        self.traces: TracePipeline | None = None

    @property
    def errors(self) -> int:
        """inferscope's internal errors on the Python side so far (``_selflog.ERRORS``)."""
        return ERRORS.value

    def drain(self) -> int:
        """Drain what the ring holds now, not what producers add meanwhile, so that a read
        returns however hard they push; returns the number of records aggregated."""
        with self._lock:
            # Device times first: the spans of the stages drained next can then carry theirs.
            self._collect_device_times()
            total = self._take_native() if self.native else self._drain_into_aggregator(RUNTIME.ring)
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
            report_error("inferscope: reading the device times of CUDA stages failed")

    def retire_ring(self, old_ring: Any) -> None:
        """Drain a ring that the runtime no longer writes to, and keep its drop count."""
        with self._lock:
            if self.native:
                self._native_collector().set_ring(RUNTIME.ring)  # drains the old one whole first
                self._take_native()
            else:
                self._drain_into_aggregator(old_ring)
            self._retired_ring_drops += old_ring.dropped
            self._publish_counts(RUNTIME.ring)

    # --- the native drainer (C backend) ------------------------------------------------------

    def _native_collector(self) -> Collector:
        # Caller holds self._lock.
        collector = self._collector
        if collector is None:
            from ._native import Collector

            below, next_start = _sub_bucket_tables(SCALE)
            collector = Collector(SCALE, below, next_start)
            REGISTRY.on_inference_key = self._mark_inference
            for info in REGISTRY.infos():  # after the hook is set: no key is missed
                if info.kind == "inference" and info.model is not None:
                    collector.mark_inference(info.key)
            self._collector = collector
            # inferscope's own threads' CPU is not the inferences': the sharer leaves it out.
            OWN_THREADS.on_change = collector.set_own_threads
            collector.set_own_threads(*OWN_THREADS.clocks())
        if not isinstance(WINDOWS.sharer, NativeCpuSharer):
            WINDOWS.sharer = NativeCpuSharer(collector)  # the windows' process CPU comes from it
        if collector.ring is not RUNTIME.ring:
            collector.set_ring(RUNTIME.ring)
        return collector

    def _mark_inference(self, key: int) -> None:
        collector = self._collector
        if collector is not None:
            try:
                collector.mark_inference(key)
            except Exception:
                report_error("inferscope: marking an inference key for the native drainer failed")

    def _take_native(self) -> int:
        # Caller holds self._lock. The collector drains what the ring holds now, GIL released.
        fold, traced, counts = self._native_collector().collect(_COLLECT_TIMEOUT_MILLIS)
        self._native_counts = counts
        folded = int(counts[0]) - self._collected
        self._collected = counts[0]
        if fold is not None:
            batch = batch_fold_of_native(fold)
            try:
                AGGREGATOR.add_fold(batch)
            except Exception:
                # Out of the ring already: count it, never lose it silently.
                self._unaggregated += int(batch.duration.value_count.sum())
                folded = 0
                report_error("inferscope: aggregating a batch of records failed")
        traces = self.traces
        if traces is not None and traced:
            try:
                traces.add(np.frombuffer(traced, RECORD_DTYPE))
            except Exception:
                report_error("inferscope: building spans from a batch of records failed")
        return folded

    # --- the pure-Python backend's drain -------------------------------------------------------

    def _drain_into_aggregator(self, ring: Any) -> int:
        # Caller holds self._lock: the ring has a single consumer. Only what the ring held when the
        # drain began is taken: producers that never pause would otherwise keep the drain, and
        # every reader waiting on the lock, going for as long as they run.
        total = 0
        left = len(ring)
        if not left:
            return 0
        if self._buffer is None:
            self._buffer = empty_records(_DRAIN_BATCH)
        buffer = self._buffer
        with _short_switch_interval():
            while left > 0:
                n = ring.drain(buffer[: min(left, len(buffer))])
                left -= n
                if n:
                    try:
                        AGGREGATOR.add(buffer[:n])
                        total += n
                    except Exception:
                        # The batch is out of the ring already: count it, never lose it silently.
                        self._unaggregated += n
                        report_error("inferscope: aggregating a batch of records failed")
                    traces = self.traces
                    if traces is not None:
                        try:
                            traces.add(buffer[:n])
                        except Exception:
                            report_error("inferscope: building spans from a batch of records failed")
                    WINDOWS.add_records(buffer[:n])  # never raises
                if n == 0:
                    break
        return total

    def _publish_counts(self, ring: Any) -> None:
        AGGREGATOR.set_dropped(DROP_RING_FULL, self._retired_ring_drops + ring.dropped)
        AGGREGATOR.set_dropped(DROP_STACK_DEPTH, RUNTIME.depth_dropped)
        unaggregated = self._unaggregated + self._native_counts[1]
        if unaggregated:
            AGGREGATOR.set_dropped(DROP_AGGREGATION_FAILED, unaggregated)
        if DEVICE_TIMER.dropped:
            AGGREGATOR.set_dropped(DROP_GPU_TIMING_BACKLOG, DEVICE_TIMER.dropped)
        if self.traces is not None:
            spans_dropped = dict(self.traces.all_spans_dropped())
            if self._native_counts[2]:
                spans_dropped[DROP_DRAIN_BACKLOG] = self._native_counts[2]
            AGGREGATOR.set_spans_dropped(spans_dropped)
        AGGREGATOR.set_internal_errors(RUNTIME.internal_errors + ERRORS.value + DEVICE_TIMER.errors)

    # --- the thread ------------------------------------------------------------------------------

    def start(self, interval_millis: int) -> None:
        self.stop()
        self.interval_millis = interval_millis
        if self.native:
            try:
                with self._lock:
                    self._native_collector().start(interval_millis)
            except Exception:
                report_error(
                    "inferscope: the native drainer did not start; records are drained on reads only"
                )
        elif isinstance(WINDOWS.sharer, NativeCpuSharer):
            WINDOWS.sharer = ProcessCpuSharer(REGISTRY)  # the Python drain on the C backend (benchmarks)
        if not self.native and self._wake is None:
            try:
                self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                report_error("inferscope: no pipe for the drainer's wake-ups; it drains every interval only")
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="inferscope-drainer", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_millis: float = 5000) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake_up()
        collector = self._collector
        if collector is not None and collector.running and not collector.stop(int(timeout_millis)):
            report_error("inferscope: the native drainer's thread did not stop in time")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_millis / 1e3)

    def _wake_up(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is pending already
                os.write(self._wake[1], b"\x01")

    def _run(self, stop: threading.Event) -> None:
        with OWN_THREADS.running():
            if self.native:
                self._run_native(stop)
            else:
                self._run_python(stop)

    def _run_native(self, stop: threading.Event) -> None:
        # The native thread drains, folds and shares process CPU on its own; this one wakes only
        # when Python has work: the canary, a window's close, the multiprocess publication, and
        # spans while tracing is on (every interval).
        interval = self.interval_millis / 1e3
        while True:
            if self.traces is not None or PUBLISHER.enabled:
                wait = interval
            else:
                wait = min(max(interval, WINDOWS.seconds_until_due()), _NATIVE_LONGEST_WAIT_S)
            if stop.wait(wait):
                return
            try:
                if self.traces is not None:
                    self.drain()
                collector = self._collector
                folded = 0 if collector is None else collector.folded
                aggregated, self._ticked = max(folded - self._ticked, 0), folded
                WINDOWS.tick()  # closes a window every window_seconds; never raises
                PUBLISHER.tick(aggregated)  # multiprocess: publishes for the shared /metrics; never raises
            except Exception:
                report_error("inferscope: draining the ring failed")

    def _run_python(self, stop: threading.Event) -> None:
        interval = self.interval_millis / 1e3
        next_due = time.monotonic() + interval
        wake = self._wake
        poller = select.poll()
        if wake is not None:
            poller.register(wake[0], select.POLLIN)
        while True:
            ring = RUNTIME.ring
            timeout = max(next_due - time.monotonic(), 0.0)
            if wake is None:
                if stop.wait(timeout):
                    return
            else:
                if ring.wake_fd != wake[1]:
                    ring.wake_fd = wake[1]  # at start, and after a reset of the ring
                if poller.poll(math.ceil(timeout * 1e3)):
                    with contextlib.suppress(OSError):
                        os.read(wake[0], 4096)
                if stop.is_set():
                    return
            ring = RUNTIME.ring
            if time.monotonic() < next_due and len(ring) < ring.capacity // 2:
                continue
            next_due = time.monotonic() + interval
            try:
                aggregated = self.drain()
                WINDOWS.tick()  # closes a window every window_seconds; never raises
                PUBLISHER.tick(aggregated)  # multiprocess: publishes for the shared /metrics; never raises
            except Exception:
                report_error("inferscope: draining the ring failed")

    def after_fork_in_child(self) -> None:
        # Only the forking thread survives fork(): the lock may be held by a thread that is gone.
        self._lock = threading.Lock()
        self._retired_ring_drops = 0
        self._unaggregated = 0
        self._collected = 0
        self._ticked = 0
        self._native_counts = (0, 0, 0, 0, 0)
        self.traces = None
        self._thread = None
        self._stop = threading.Event()
        if self._collector is not None:
            # No thread, no pipe and nothing folded: the parent exports what it folded.
            self._collector.after_fork_in_child()
        # The parent's pipe: the child's producers stop writing to it before its ends are closed,
        # and the child's drainer makes its own when it starts.
        RUNTIME.ring.wake_fd = -1
        wake, self._wake = self._wake, None
        if wake is not None:
            for fd in wake:
                with contextlib.suppress(OSError):
                    os.close(fd)


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
    global _switch_interval_saved
    previous = sys.getswitchinterval()
    if previous <= _DRAIN_SWITCH_INTERVAL_S:
        yield
        return
    _switch_interval_saved = previous
    sys.setswitchinterval(_DRAIN_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        _switch_interval_saved = None
        if abs(sys.getswitchinterval() - _DRAIN_SWITCH_INTERVAL_S) < 1e-7:
            sys.setswitchinterval(previous)


#: The application's switch interval while a drain runs with the short one.
_switch_interval_saved: float | None = None


def _restore_switch_interval_after_fork() -> None:
    # A fork in the middle of a drain: the drain's thread is gone and would never restore it.
    global _switch_interval_saved
    saved, _switch_interval_saved = _switch_interval_saved, None
    if saved is not None and abs(sys.getswitchinterval() - _DRAIN_SWITCH_INTERVAL_S) < 1e-7:
        sys.setswitchinterval(saved)


DRAINER = Drainer()


def collect_view() -> AggregateView:
    """Drain the ring, then return the aggregates: what every exporter and reader sees."""
    DRAINER.drain()
    return AGGREGATOR.view()


class Exports:
    """The export side built from one ``Settings``: our MeterProvider, a wrapped user provider,
    the Prometheus endpoint and the span processors.

    Building it (``__init__``) touches nothing that runs: the exporters are made and the endpoint
    bound, but nothing is exported and no global hook is installed until ``activate()``. A setting
    that cannot be served raises ``ConfigError`` with everything built so far closed again, so
    ``configure()`` can keep the running pipeline when the new one fails. With ``strict=False``
    (configuration from the environment, or after fork) a Prometheus endpoint that cannot be
    served costs that exporter only: it is logged once, and the rest runs.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        serve_prometheus: bool = True,
        resource: Resource | None = None,
        previous: Exports | None = None,
        strict: bool = True,
    ) -> None:
        self.settings = settings
        self.resource = resource if resource is not None else _resource(settings)
        self.own_wrappers: list[AggregatesExporter] = []
        self.meter_provider: MeterProvider | None = None
        self.user_provider: Any = settings.meter_provider
        self.prometheus: PrometheusServer | None = None
        self.prometheus_collector: PrometheusCollector | None = None
        self._prometheus_taken_over = False
        #: multiprocess: a sibling worker (or the master) serves the port; this one takes it over
        #: when that one goes.
        self._prometheus_standby = False
        self._previous_collector: PrometheusCollector | None = None
        self.traces: TracePipeline | None = None
        self._span_queues: list[BoundedBatchSpanProcessor] = []
        self._own_span_processor: Any = None
        self._wrapped_user_provider = False
        self._unattached_exporters: list[MetricExporter] = []
        try:
            self._build(settings, serve_prometheus, previous, strict)
        except BaseException:
            self._close_unused()
            raise

    def _build(
        self, settings: Settings, serve_prometheus: bool, previous: Exports | None, strict: bool
    ) -> None:
        histogram = {
            "aggregation": settings.histogram_aggregation,
            "boundaries": settings.histogram_boundaries,
            "max_buckets": settings.histogram_max_buckets,
            "counters": counter_metrics(settings.counter_mask),
        }
        if serve_prometheus and "prometheus" in settings.metrics_exporters:
            self._serve_prometheus(settings, previous, strict)
        ours = [
            _build_setting("metrics_exporters", name, functools.partial(_make_exporter, name, settings))
            for name in settings.metrics_exporters
            if name != "prometheus"
        ]
        given: list[MetricExporter] = list(settings.metric_exporters)  # type: ignore[arg-type]
        self._unattached_exporters = ours  # closed by _close_unused until a reader owns them
        if settings.tracing:
            self._build_tracing(settings)
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
                wrapper.active = False  # until activate(): the running pipeline still exports
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
            self._unattached_exporters = []
            for reader in readers:
                export_empty_collections(reader)
            register_system_metrics(self.meter_provider.get_meter("inferscope", _version()))
        provider: Any = self.user_provider
        if provider is not None:
            # Idempotent: after fork the child keeps the wrappers its parent installed.
            self._wrapped_user_provider = previous is None or previous.user_provider is not provider
            _build_setting(
                "meter_provider",
                provider,
                lambda: wrap_meter_provider(provider, collect_view, **histogram),  # type: ignore[arg-type]
            )
            if provider not in _providers_with_system_metrics:
                # Observable instruments live as long as their provider: register them once.
                _providers_with_system_metrics.add(provider)
                register_system_metrics(provider.get_meter("inferscope", _version()))

    def _serve_prometheus(self, settings: Settings, previous: Exports | None, strict: bool) -> None:
        if settings.multiprocess:
            # One scrape for every worker of the server: the merged view of their publications.
            self.prometheus_collector = merged_collector(settings, self.resource)
        else:
            self.prometheus_collector = PrometheusCollector(
                collect_view,
                settings.histogram_boundaries,
                counters=counter_metrics(settings.counter_mask),
                resource=self.resource,  # served as target_info
            )
        old = previous.prometheus if previous is not None else None
        if (
            old is not None
            and settings.prometheus_port != 0
            and (old.host, old.port) == (settings.prometheus_host, settings.prometheus_port)
        ):
            # The same address: the endpoint carries on, serving the new collector from activate().
            self.prometheus = old
            self._prometheus_taken_over = True
            self._previous_collector = previous.prometheus_collector if previous is not None else None
            return
        try:
            self.prometheus = start_prometheus_server(
                self.prometheus_collector, settings.prometheus_host, settings.prometheus_port
            )
        except OSError as exc:
            if settings.multiprocess and exc.errno == errno.EADDRINUSE:
                # Another worker of the server (or its master) serves every worker's metrics
                # there: not an error, and nothing to log. This one takes over if that one goes.
                self._prometheus_standby = True
                return
            error = _prometheus_error(settings, exc)
            if strict:
                raise error from None
            # A port that another process holds (a sibling worker of a pre-fork server, say)
            # costs this exporter only: recording and the other exporters go on.
            self.prometheus_collector = None
            _logger.error("inferscope: not serving Prometheus metrics: %s", error)

    def _build_tracing(self, settings: Settings) -> None:
        """Span processors for our exporters (or the application's TracerProvider) and the
        pipeline that builds spans; ``activate()`` links the hot path to them."""
        from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor

        processor = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        self._own_span_processor = processor
        exporters = [
            _build_setting("traces_exporters", name, functools.partial(_make_span_exporter, name, settings))
            for name in settings.traces_exporters
        ]
        exporters += list(settings.span_exporters)  # type: ignore[arg-type]
        for exporter in exporters:
            queue = BoundedBatchSpanProcessor.from_environment(exporter)
            self._span_queues.append(queue)
            processor.add_span_processor(queue)
        resource = self.resource
        provider: Any = settings.tracer_provider
        if provider is not None:
            # The application's processors and Resource: our spans travel with its own.
            app_processor = _otel_compat.active_span_processor(provider)
            if app_processor is not None:
                processor.add_span_processor(app_processor)
            resource = provider.resource
        self.traces = TracePipeline(
            registry=REGISTRY,
            processor=processor,
            resource=resource,
            policy=_trace_policy(settings),
            quantiles=AGGREGATOR.duration_quantiles,
            monotonic_ns=_monotonic_ns,
            counters=counter_metrics(settings.counter_mask),
            scope_version=_version(),
            queues=self._span_queues,
        )

    def activate(self) -> None:
        """Start exporting: the wrappers add inferscope's points, a Prometheus endpoint taken over
        from the previous pipeline serves the new collector, and tracing links the hot path."""
        for wrapper in self.own_wrappers:
            wrapper.active = True
        if self._prometheus_taken_over and self.prometheus is not None and self.prometheus_collector:
            registry = self.prometheus.registry
            if self._previous_collector is not None:
                registry.unregister(self._previous_collector)
            registry.register(self.prometheus_collector)
        if self._prometheus_standby:
            PUBLISHER.on_tick = self._take_over_prometheus
        if self.traces is not None:
            hooks = install_runtime_context(RUNTIME.current_span)
            if hooks is None:
                self._shutdown_span_queues(0)
                self.traces = None
                return
            var, span_key = hooks
            policy = self.traces.policy
            RUNTIME.set_tracing(var, span_key, policy.ratio_bound, policy.parent_based)

    def stand_by_for_prometheus(self) -> None:
        """multiprocess, in a forked worker: serve the shared endpoint once the process that serves
        it (the parent, or a sibling) stops; the drainer tries, not the fork handler."""
        self.prometheus_collector = merged_collector(self.settings, self.resource)
        self._prometheus_standby = True

    def _take_over_prometheus(self) -> None:
        """multiprocess: serve the shared endpoint once the worker that served it is gone (called
        by the publisher on the drainer thread). Skipped while configure() or shutdown() runs."""
        if self.prometheus is not None or self.prometheus_collector is None:
            PUBLISHER.on_tick = None
            return
        if not _lock.acquire(blocking=False):
            return
        try:
            if _exports is not self:
                return
            settings = self.settings
            try:
                self.prometheus = start_prometheus_server(
                    self.prometheus_collector, settings.prometheus_host, settings.prometheus_port
                )
            except OSError:
                return  # still served elsewhere
            self._prometheus_standby = False
            PUBLISHER.on_tick = None
        finally:
            _lock.release()

    def _close_unused(self) -> None:
        """Close what a failed build made; the running pipeline keeps what it owns."""
        self._shutdown_span_queues(0)
        self.traces = None
        for exporter in self._unattached_exporters:
            with contextlib.suppress(Exception):
                exporter.shutdown(timeout_millis=0)
        if self.meter_provider is not None:
            with contextlib.suppress(Exception):
                self.meter_provider.shutdown(timeout_millis=_CLOSE_UNUSED_MILLIS)
        if self._wrapped_user_provider:
            unwrap_meter_provider(self.user_provider)
        if self.prometheus is not None and not self._prometheus_taken_over:
            self.prometheus.shutdown(timeout_millis=_CLOSE_UNUSED_MILLIS)
        self.prometheus = None

    def shutdown(self, timeout_millis: float, successor: Exports | None = None) -> None:
        """Export what was recorded and stop, within ``timeout_millis`` for metrics and spans
        together: spans are exported while the metric exporters finish. ``successor``, the
        pipeline replacing this one, keeps what it took over (the endpoint, a user provider)."""
        deadline = time.monotonic() + timeout_millis / 1e3
        # The span queues export meanwhile; a slice of the budget is kept for their exporters to
        # be shut down and their threads to end, whatever the metric exporters took.
        reserve_ms = min(timeout_millis * 0.2, 500.0) if self._span_queues else 0.0

        def left() -> float:
            return max(0.0, (deadline - time.monotonic()) * 1e3 - reserve_ms)

        tracing = self.traces is not None
        if tracing:
            RUNTIME.set_tracing(None)
            uninstall_runtime_context()
            self.traces = None
        for queue in self._span_queues:
            queue.begin_shutdown()  # their threads export while the metrics go out below
        if self.meter_provider is not None:
            # The readers' final collection exports everything aggregated so far.
            _within(left(), "shutting down the metric exporters", self.meter_provider.shutdown, left())
        keeps_provider = successor is not None and successor.user_provider is self.user_provider
        if self.user_provider is not None:
            flush = self.user_provider.force_flush
            _within(left(), "flushing the application's MeterProvider", flush, left())
            if not keeps_provider:
                unwrap_meter_provider(self.user_provider)
        handed_over = successor is not None and successor.prometheus is self.prometheus
        if self.prometheus is not None and not handed_over:
            self.prometheus.shutdown(timeout_millis=left())
        if tracing:
            app_processor = _otel_compat.active_span_processor(self.settings.tracer_provider)
            if app_processor is not None:
                # The application's TracerProvider is only flushed: it is the application's.
                what = "flushing the application's span processors"
                _within(left(), what, app_processor.force_flush, int(left()))
        self._shutdown_span_queues(left() + reserve_ms)

    def _shutdown_span_queues(self, timeout_millis: float) -> None:
        deadline = time.monotonic() + timeout_millis / 1e3
        for queue in self._span_queues:
            queue.shutdown(max(0.0, (deadline - time.monotonic()) * 1e3))

    def stop_tracing(self, timeout_millis: float) -> None:
        """Stop giving entries span ids, then export the spans built so far."""
        if self.traces is None:
            return
        RUNTIME.set_tracing(None)
        uninstall_runtime_context()
        self.traces = None
        self._shutdown_span_queues(timeout_millis)

    def detach_after_fork(self) -> None:
        """In a forked child: stop contributing to the parent's exporters and endpoint.

        The SDK restarts its reader threads in the child; our wrappers then add nothing and skip
        their delegate, so the parent's connections are never used from the child. A user's own
        MeterProvider keeps exporting the child's data, since the application owns it.
        """
        for wrapper in self.own_wrappers:
            wrapper.active = False
        if self.prometheus is not None and self.settings.multiprocess:
            # This process's copy of the parent's listening socket: closing it leaves the parent's
            # open, and lets this worker take the port over once the parent stops serving it.
            with contextlib.suppress(OSError):
                self.prometheus.socket_close_in_child()
        self.prometheus = None  # the parent's socket and thread; not ours to close


#: What a failed build may spend closing what it had started (reader threads, an endpoint).
_CLOSE_UNUSED_MILLIS = 500


def _build_setting(setting: str, value: object, build: Callable[[], _T]) -> _T:
    """``build()``, with a failure turned into a ConfigError that names ``setting``."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            setting,
            value,
            "a value whose exporter can be built here",
            message=redact(
                f"{setting}: got {value!r}, but it could not be set up: {type(exc).__name__}: {exc}"
            ),
        ) from None


def _prometheus_error(settings: Settings, exc: OSError) -> ConfigError:
    host, port = settings.prometheus_host, settings.prometheus_port
    if isinstance(exc, socket.gaierror):
        return ConfigError(
            "prometheus_host",
            host,
            "a host name or address of this machine",
            message=f"prometheus_host: got {host!r}, which does not resolve ({exc}); "
            "accepted: a host name or address of this machine",
        )
    return ConfigError(
        "prometheus_port",
        port,
        "a port that this process can bind, or 0 for a free one",
        message=f"prometheus_port: cannot serve on {host}:{port} ({exc.strerror or exc}); accepted: a port "
        "that this process can bind on prometheus_host, or 0 for a free one",
    )


def _within(timeout_millis: float, what: str, call: Callable[..., Any], *args: Any) -> None:
    """Run ``call(*args)`` in a helper thread and wait for it at most ``timeout_millis``: the
    SDK's flushes and shutdowns call exporters that may wait much longer than they are asked to
    (a force_flush of a BatchSpanProcessor has no timeout). A failure is logged, never raised."""

    deadline = time.monotonic() + timeout_millis / 1e3
    logged = threading.Lock()  # held once the timeout is logged: by whichever thread sees it first

    def give_up() -> None:
        if logged.acquire(blocking=False):
            _logger.warning(
                "inferscope: %s did not finish within the shutdown timeout; what it had not "
                "exported is dropped",
                what,
            )

    def run() -> None:
        try:
            call(*args)
        except Exception as exc:
            # The SDK raises when its own deadline, the same as ours, ran out: that is a timeout.
            if time.monotonic() >= deadline - 0.05:
                give_up()
            else:
                _logger.warning("inferscope: %s failed: %s", what, redact(str(exc)))

    thread = threading.Thread(target=run, name="inferscope-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_millis / 1e3)
    if thread.is_alive():
        give_up()


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


@functools.cache
def _quiet(cls: type[_T]) -> type[_T]:
    """``cls`` whose ``export`` limits the exporter library's own log lines to one a minute
    (``_selflog.exporting_quietly``); for the exporters inferscope builds, never the application's."""

    def export(self: Any, *args: Any, **kwargs: Any) -> Any:
        with exporting_quietly(self):
            return cls.export(self, *args, **kwargs)  # type: ignore[attr-defined]

    quiet_exporter_loggers()  # the exporter's module is imported by now: its loggers exist
    namespace = {"export": export, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), namespace)


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
        exporter: MetricExporter = _quiet(HttpExporter)(endpoint=endpoint, timeout=timeout_s)
        return exporter
    if not GRPC_CALLS.usable:
        return UnusableMetricExporter()  # forked while a gRPC call was in flight (export/grpc_fork.py)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    endpoint = settings.otlp_endpoint
    insecure = None if endpoint is None else endpoint.startswith("http://")
    exporter = _quiet(gated(GrpcExporter))(endpoint=endpoint, insecure=insecure, timeout=timeout_s)
    return exporter


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
        return _quiet(HttpExporter)(endpoint=endpoint, timeout=timeout_s)
    if not GRPC_CALLS.usable:
        return UnusableSpanExporter()  # forked while a gRPC call was in flight (export/grpc_fork.py)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    insecure = None if endpoint is None else endpoint.startswith("http://")
    return _quiet(gated(GrpcExporter))(endpoint=endpoint, insecure=insecure, timeout=timeout_s)


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
#: The pipelines of the processes this one was forked from: used no more, and never freed here.
_inherited_exports: list[Exports] = []
#: Settings read from the environment at import, applied on the first key (the first tracked
#: function or stage) or the first read: importing inferscope starts no thread.
_deferred: Settings | None = None


def configure(**settings: Any) -> Settings:
    """Configure inferscope; optional, since environment variables work alone.

    Idempotent and safe to call again: the pipeline is rebuilt from the new settings while
    aggregates and keys are kept. The new pipeline is built before the running one is stopped:
    when a setting is invalid, or cannot be served (a Prometheus port in use, a host that does not
    resolve), ``ConfigError`` names it, the value it got and what it accepts, and the running
    pipeline goes on unchanged.

    >>> import inferscope
    >>> inferscope.configure(counters="minimal", metrics_exporters=["prometheus"])  # doctest: +SKIP
    """
    new = load_settings(settings)
    with _lock:
        _apply(new, strict=True)
    return new


def _apply(settings: Settings, *, strict: bool) -> None:
    global _settings, _exports, _deferred
    previous = _exports
    # Everything that can fail on a setting happens first, while the running pipeline runs.
    exports = Exports(settings, previous=previous, strict=strict) if settings.enabled else None
    _deferred = None
    deadline = time.monotonic() + settings.shutdown_timeout_millis / 1e3
    DRAINER.stop(settings.shutdown_timeout_millis)
    PUBLISHER.on_tick = None
    if previous is not None:
        DRAINER.drain()
        DRAINER.traces = None
        previous.shutdown(max(0.0, (deadline - time.monotonic()) * 1e3), successor=exports)
    _apply_runtime(settings)
    _settings = settings
    _exports = exports
    if exports is None:
        PUBLISHER.close()
        return
    # Threads of torch, BLAS and OpenMP beyond the CPUs this process may use: warn once, now and
    # whenever one of those libraries is imported later.
    check_oversubscription()
    install_import_hook()
    PUBLISHER.configure(settings, collect_view, EXEMPLARS)  # drains first: the native drainer merges on reads
    exports.activate()
    DRAINER.traces = exports.traces
    install_detector(settings)  # the regression detector reads every window as it closes
    DRAINER.start(settings.drain_interval_millis)


def _apply_runtime(settings: Settings) -> None:
    """What the hot path reads: counters, the ring, the key cap, and whether it records."""
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
    RUNTIME.enabled = settings.enabled


def _start_deferred() -> None:
    """Apply the settings read at import, once: on the first key or the first read."""
    global _deferred
    if _deferred is None:
        return
    with _lock:
        settings = _deferred
        if settings is None:
            return
        try:
            _apply(settings, strict=False)
        except Exception:
            _deferred = None
            RUNTIME.enabled = False
            _logger.error("inferscope is disabled: starting it failed", exc_info=True)


def shutdown(timeout_millis: float | None = None) -> None:
    """Flush everything recorded so far to every exporter, then stop. Also runs at exit.

    ``timeout_millis`` (default: the ``shutdown_timeout_millis`` setting, 5 s) bounds the whole
    of it, metrics and spans together: a backend that is down or never answers costs at most
    that. Calls made after ``shutdown()`` are passed straight through, unrecorded, until the next
    ``configure()``. Never raises, except ``KeyboardInterrupt``, which ends it at once.
    """
    global _exports, _deferred
    _deferred = None  # a pipeline that never started stays stopped, until configure()
    REGISTRY.on_first_key = None
    if timeout_millis is None:
        settings = _settings
        timeout_millis = settings.shutdown_timeout_millis if settings is not None else _EXIT_TIMEOUT_MILLIS
    deadline = time.monotonic() + timeout_millis / 1e3

    def left() -> float:
        return max(0.0, (deadline - time.monotonic()) * 1e3)

    with _lock:
        try:
            DRAINER.stop(left())
            RUNTIME.enabled = False
            # Stages on CUDA whose work is still running: their device time is recorded too.
            DEVICE_TIMER.wait(min(left() / 1e3, 2.0))
            DRAINER.drain()
            WINDOWS.shutdown()  # the last, partial window: recorded and handed on
            PUBLISHER.on_tick = None
            PUBLISHER.close()  # multiprocess: everything counted, published before the slot is given up
            exports, _exports = _exports, None
            DRAINER.traces = None
            if exports is not None:
                exports.shutdown(left())
        except Exception:
            _logger.error("inferscope: shutdown failed", exc_info=True)


def snapshot() -> Snapshot:
    """Per model and per stage: count, errors, p50/p90/p95/p99, max, mean, CPU time and CPU/wall.

    >>> import inferscope
    >>> snap = inferscope.snapshot()
    >>> isinstance(snap.table(), str)
    True
    """
    _start_deferred()
    mask = _settings.counter_mask if _settings is not None else 0
    return build_snapshot(collect_view(), BACKEND, counter_metrics(mask))


def current_settings() -> Settings | None:
    """The settings in force, or None before the first (automatic or explicit) configuration."""
    return _settings


def prometheus_port() -> int | None:
    """The port the Prometheus endpoint is bound to, if one is being served."""
    _start_deferred()
    exports = _exports
    return exports.prometheus.port if exports is not None and exports.prometheus is not None else None


def _after_fork_in_child() -> None:
    OWN_THREADS.after_fork_in_child()
    RUNTIME.after_fork_in_child()
    AGGREGATOR.after_fork_in_child()
    DRAINER.after_fork_in_child()
    _restore_switch_interval_after_fork()
    global _lock, _exports
    _lock = threading.RLock()
    settings, exports = _settings, _exports
    if settings is None or not settings.enabled or _deferred is not None:
        return  # not started yet: the child starts on its own first key, as the parent would
    try:
        # Rebuilt here, in the forking thread, while no other thread of this process exists yet:
        # a thread started from a fork handler would race the handlers that run after this one
        # (concurrent.futures, for one, resets its locks there). The child keeps the parent's
        # resource with its own process.pid and service.instance.id, so building it needs no
        # resource detectors. The parent owns the Prometheus port: a child serves none unless
        # configure() asks. Every lock this takes was replaced above or by its owner's own fork
        # hook (the key registry, the exemplars, the span queues, the log limiter), since the
        # parent's threads may have held any of them at fork().
        resource = None
        if exports is not None:
            exports.detach_after_fork()
            # Kept: freeing the parent's gRPC channels would call into gRPC (export/grpc_fork.py).
            _inherited_exports.append(exports)
            resource = exports.resource.merge(
                Resource({"process.pid": os.getpid(), "service.instance.id": str(uuid.uuid4())})
            )
        _exports = Exports(settings, serve_prometheus=False, resource=resource, strict=False)
        if settings.multiprocess and "prometheus" in settings.metrics_exporters:
            _exports.stand_by_for_prometheus()
        _exports.activate()
        DRAINER.traces = _exports.traces
    except Exception:
        _exports = None
        _logger.error("inferscope: rebuilding exporters after fork failed", exc_info=True)
    DRAINER.start(settings.drain_interval_millis)


def autoconfigure() -> None:
    """Configure from the environment at import. Never raises: an invalid variable is logged at
    ERROR and inferscope stays off (calls pass straight through) until configure() succeeds.

    Nothing starts here: the pipeline (the drainer thread, exporters, the Prometheus endpoint)
    starts on the first key (the first tracked function or stage), on the first read, or on
    ``configure()``. Until then records wait in the ring."""
    global _deferred, _settings
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
    with _lock:
        if not settings.enabled:
            _apply(settings, strict=False)
            return
        _apply_runtime(settings)
        _settings = _deferred = settings
        REGISTRY.on_first_key = _start_deferred
        if len(REGISTRY) > 2:  # keys made before this import finished: start now
            _start_deferred()


def reset_aggregates() -> None:
    """Drain the ring and forget every aggregate (keys stay). For tests: each starts from zero."""
    DRAINER.drain()
    AGGREGATOR.reset()
    EXEMPLARS.clear()


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except KeyboardInterrupt:
        # Ctrl-C while exiting: stop waiting for the exporters and let the process end now.
        _logger.warning("inferscope: shutdown interrupted; what was not exported yet is lost")


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
