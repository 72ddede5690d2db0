"""Traces: spans built after the fact from ring records, and kept or dropped once the call ended.

An OTel Python span costs tens of microseconds, more than many inferences take. inferscope pays
almost none of it on the hot path: while tracing is on, each entry only gets a span id, its trace id
and its parent's span id when it opens (``trace_open`` in ``_native/ringbuf.c``), and its record
carries them. Everything else happens here, in the drainer:

1. **Sampling, decided after the call.** Records are grouped by their *root*: the outermost
   traced entry of their frame, normally the inference. A root is kept when

   - it was sampled when it opened: its parent span was sampled (parent-based sampling, so traces
     are never broken), or the ratio picked its trace id (as OTel's ``TraceIdRatioBased`` does);
   - it failed (``trace_errors``);
   - it was slow: slower than ``trace_slow_ms``, or than the running p99 (p90, p95, p999) of its key.

   Every record under a kept root becomes a span, and none under a dropped one. Roots kept only
   for being slow or failing are capped at ``trace_max_spans_per_second`` (a token bucket counted
   in spans); what the cap drops is counted in ``inferscope.sdk.spans.dropped``. Roots sampled
   when they opened are never capped: spans the application made inside them are already out.

2. **Spans** are ``ReadableSpan`` objects with the recorded ids and timestamps, handed to span
   processors: one :class:`BoundedBatchSpanProcessor` per exporter of inferscope's own, and any
   processor of the application's TracerProvider, which see them as they see their own.

3. **Exemplars.** Each kept span leaves an exemplar (its duration, end time, trace and span id) for
   its key; the metric exporters attach the newest ones to the duration histograms.

Spans the application creates inside a tracked call find the right parent through
:class:`TracingRuntimeContext`, which wraps OTel's runtime context while tracing is on: when the
innermost open inferscope entry opened under the OTel context that is still current, the current
span *is* that entry, and the wrapper says so. This is computed only when something asks for the
current context, never on the hot path.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.context.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)

from .. import _otel_compat
from .._process_cpu import OWN_THREADS
from .._records import (
    FLAG_ABANDONED,
    FLAG_PARENT_REMOTE,
    FLAG_SAMPLED,
    FLAG_TRACED,
    SLOT_RSS_DELTA,
    SLOT_RSS_SAMPLES,
)
from .._selflog import exporter_log, exporting_quietly
from ..counters import CounterMetric, counter_label, counters_of

__all__ = [
    "DROP_EXPORT_FAILED",
    "DROP_QUEUE_FULL",
    "EXEMPLARS",
    "SLOW_QUANTILES",
    "BoundedBatchSpanProcessor",
    "ExemplarStore",
    "TracePipeline",
    "TracePolicy",
    "TracingRuntimeContext",
    "install_runtime_context",
    "uninstall_runtime_context",
]

_logger = logging.getLogger("inferscope")

#: Relative slow thresholds: ``trace_slow_ms="p99"`` keeps calls slower than their key's p99.
SLOW_QUANTILES = {"p90": 0.90, "p95": 0.95, "p99": 0.99, "p999": 0.999}
#: A relative threshold applies once a key has this many successful calls; before, the quantile
#: would be noise and "slower than p99" would keep every warm-up call.
MIN_CALLS_FOR_RELATIVE = 100
#: How often the relative thresholds are recomputed from the aggregates, after the first
#: _YOUNG_REFRESHES batches with slow-call candidates (each of which recomputes them).
_THRESHOLD_REFRESH_S = 1.0
_YOUNG_REFRESHES = 20
#: How long a kept root is remembered, for records under it that arrive later (a task it spawned).
_KEPT_MEMORY_S = 60.0
#: At most this many of them: memory stays bounded however many roots are kept per minute.
_KEPT_MAX = 65_536
#: Records whose root has not been decided are held this long, at most this many.
_PENDING_MAX_AGE_S = 30.0
_PENDING_MAX_ROWS = 100_000
#: Device times of CUDA stages held for their spans (span id -> seconds), oldest forgotten first.
_DEVICE_TIMES_MAX = 16_384
#: The share of a span processor's shutdown budget (at most _SHUTDOWN_RESERVE_MAX_S) kept for its
#: thread to end after the exporter was shut down.
_SHUTDOWN_RESERVE = 0.2
_SHUTDOWN_RESERVE_MAX_S = 0.5
#: Exemplars kept per key between two exports.
EXEMPLARS_PER_KEY = 4

DROP_RATE_LIMIT = "rate_limit"
DROP_UNRESOLVED = "unresolved"
#: Traced records past what the native drainer keeps for Python between two of its passes
#: (_native/collector.h): aggregated, but no span is built from them. Counted by the drainer.
DROP_DRAIN_BACKLOG = "drain_backlog"
#: Spans that found the export queue full, or whose export failed (a collector down or too slow).
DROP_QUEUE_FULL = "queue_full"
DROP_EXPORT_FAILED = "export_failed"
_U64 = (1 << 64) - 1
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_INTERNAL = SpanKind.INTERNAL
_UNSET = Status(StatusCode.UNSET)
_NO_EVENTS: tuple[Event, ...] = ()


@dataclass(frozen=True)
class TracePolicy:
    """What to keep; built from the settings (``trace_*`` in docs/configuration.md)."""

    ratio: float = 0.01
    parent_based: bool = True
    slow_seconds: float | None = None
    slow_quantile: float | None = 0.99
    errors: bool = True
    max_spans_per_second: int = 1000

    @property
    def ratio_bound(self) -> int:
        """The hot path samples a root when its trace id's low 64 bits are below this (as OTel's
        ``TraceIdRatioBased``); ``2**64 - 1`` stands for every root."""
        if self.ratio >= 1.0:
            return _U64
        return min(_U64 - 1, round(self.ratio * (1 << 64)))


class ExemplarStore:
    """The newest exemplars per key, written by the drainer and read by every metric exporter.

    Reading does not consume: each exporter asks for the exemplars newer than its last export.
    """

    def __init__(self, per_key: int = EXEMPLARS_PER_KEY) -> None:
        self._lock = threading.Lock()
        self._per_key = per_key
        self._by_key: dict[int, deque[Exemplar]] = {}
        # Weakly: a store dropped by its owner (a test's) is not kept alive by the hook.
        reinit = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: _call_if_alive(reinit))

    def _after_fork_in_child(self) -> None:
        # The drainer may have held the lock when another thread forked: only the forking thread
        # survives fork(), so the lock would stay taken for good. The parent's exemplars point at
        # the parent's spans; the child starts with none.
        self._lock = threading.Lock()
        self._by_key = {}

    def newest_per_key(self, keys: Sequence[int]) -> list[bool]:
        """Which of these keys, in the order their exemplars would be added, are among the last
        ``per_key`` of their key: the only ones the store would keep, so the only ones worth
        building (an exemplar costs about as much as a third of a span)."""
        kept = [False] * len(keys)
        counts: dict[int, int] = {}
        for i in range(len(keys) - 1, -1, -1):
            count = counts.get(keys[i], 0)
            if count < self._per_key:
                kept[i] = True
                counts[keys[i]] = count + 1
        return kept

    def add(self, key: int, exemplar: Exemplar) -> None:
        with self._lock:
            found = self._by_key.get(key)
            if found is None:
                found = self._by_key[key] = deque(maxlen=self._per_key)
            found.append(exemplar)

    def since(self, key: int, time_unix_nano: int) -> list[Exemplar]:
        """The exemplars of ``key`` recorded after ``time_unix_nano``, oldest first."""
        with self._lock:
            found = self._by_key.get(key)
            if not found:
                return []
            return [e for e in found if e.time_unix_nano > time_unix_nano]

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()


def _call_if_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    bound = method()
    if bound is not None:
        bound()


#: The exemplars of this process: the metric exporters read them (export/points.py, export/prometheus.py).
EXEMPLARS = ExemplarStore()


class _TokenBucket:
    def __init__(self, rate_per_second: int) -> None:
        self.rate = float(rate_per_second)
        self.tokens = self.rate
        self._last = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self._last) * self.rate)
        self._last = now


class TracePipeline:
    """Records in, spans out: sampling, span building and exemplars (see the module docstring).

    ``add()`` runs on the drainer thread only, after each batch is aggregated; ``quantiles(q,
    min_count)`` returns each key's duration quantile in seconds (``Aggregator.duration_quantiles``).
    """

    def __init__(
        self,
        *,
        registry: Any,
        processor: SpanProcessor,
        resource: Resource,
        policy: TracePolicy,
        quantiles: Callable[[float, int], Mapping[int, float]],
        monotonic_ns: Callable[[], int],
        counters: Sequence[CounterMetric] = (),
        exemplars: ExemplarStore = EXEMPLARS,
        scope_version: str = "",
        queues: Sequence[BoundedBatchSpanProcessor] = (),
    ) -> None:
        self.registry = registry
        self.processor = processor
        #: inferscope's own export queues (inside ``processor``), whose losses count as drops here.
        self.queues = tuple(queues)
        self.resource = resource
        self.policy = policy
        self.exemplars = exemplars
        #: Spans handed to the processor, and roots or spans dropped by reason.
        self.spans_exported = 0
        self.spans_dropped: dict[str, int] = {DROP_RATE_LIMIT: 0, DROP_UNRESOLVED: 0}
        self._quantiles = quantiles
        self._monotonic_ns = monotonic_ns
        self._counters = tuple(counters)
        self._stage_counters = tuple(counters_of(self._counters, "stage"))
        #: span id -> device time (s) of a stage marked device="cuda", until its span is built.
        self._device_times: dict[int, float] = {}
        self._scope = InstrumentationScope("inferscope", scope_version)
        self._bucket = _TokenBucket(policy.max_spans_per_second)
        self._thresholds = np.zeros(0, dtype=np.int64)  # per key, in ns; 0 = none
        self._thresholds_at = -_THRESHOLD_REFRESH_S
        self._young_refreshes = _YOUNG_REFRESHES
        self._kept: dict[int, float] = {}  # root span id -> when it was kept (monotonic s)
        self._dropped_before = np.zeros(0, dtype=np.uint64)  # roots dropped by the previous batch
        self._pending: np.ndarray | None = None
        self._names: dict[int, tuple[str, dict[str, Any], bool]] = {}

    # -- sampling ---------------------------------------------------------------------------------

    def add(self, records: np.ndarray) -> None:
        """Decide, build and hand over the spans of one drained batch (copied; ``records`` may be
        reused by the caller afterwards)."""
        traced = records[(records["flags"] & FLAG_TRACED) != 0]
        if traced.size == 0 and self._pending is None:
            return
        is_root = traced["span_id"] == traced["root_id"]
        roots = traced[is_root]
        children = traced[~is_root]
        if self._pending is not None:
            children = np.concatenate([self._pending, children])
            self._pending = None

        keep, reasons = self._decide(roots, children["root_id"])
        now = time.monotonic()
        kept_roots = roots[keep]
        for root_id in kept_roots["span_id"].tolist():
            self._kept[root_id] = now
        dropped_now = roots["span_id"][~keep]

        known_kept = np.fromiter(self._kept, dtype=np.uint64, count=len(self._kept))
        child_kept = np.isin(children["root_id"], known_kept)
        child_dropped = np.isin(children["root_id"], dropped_now) | np.isin(
            children["root_id"], self._dropped_before
        )
        self._dropped_before = dropped_now
        waiting = children[~child_kept & ~child_dropped]
        if waiting.size:
            self._hold(waiting)

        offset_ns = time.time_ns() - self._monotonic_ns()
        self._emit(kept_roots, reasons[keep], offset_ns)
        self._emit(children[child_kept], None, offset_ns)
        self._forget(now)

    def add_device_times(self, span_ids: Sequence[int], seconds: Sequence[float]) -> None:
        """Device times of CUDA stages, read before their records are drained: the stage's span
        gets ``inferscope.gpu.time``. A time whose span is never built is forgotten, oldest first."""
        times = self._device_times
        for span_id, value in zip(span_ids, seconds, strict=True):
            if span_id:
                times[span_id] = value
        excess = len(times) - _DEVICE_TIMES_MAX
        if excess > 0:
            for span_id in list(itertools.islice(times, excess)):
                del times[span_id]

    def _decide(self, roots: np.ndarray, child_roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which roots to keep, and why (an array of reason strings)."""
        policy = self.policy
        head = (roots["flags"] & FLAG_SAMPLED) != 0
        reasons = np.full(roots.size, "", dtype=object)
        reasons[head] = "sampled"
        tail = np.zeros(roots.size, dtype=bool)
        if policy.errors:
            failed = (roots["error"] != 0) & ~head
            reasons[failed] = "error"
            tail |= failed
        slow = self._slow(roots) & ~head & ~tail
        reasons[slow] = "slow"
        tail |= slow
        keep = head | tail
        if keep.any():
            keep &= ~self._over_budget(roots, head, tail, child_roots)
        return keep, reasons

    def _slow(self, roots: np.ndarray) -> np.ndarray:
        policy = self.policy
        wall = roots["wall_ns"]
        if policy.slow_seconds is not None:
            return wall > int(policy.slow_seconds * 1e9)
        if policy.slow_quantile is None or roots.size == 0:
            return np.zeros(roots.size, dtype=bool)
        now = time.monotonic()
        # Every batch while the quantiles are young (they move fast then), then once a second.
        if now - self._thresholds_at >= _THRESHOLD_REFRESH_S or self._young_refreshes > 0:
            self._young_refreshes = max(0, self._young_refreshes - 1)
            self._thresholds_at = now
            quantiles = self._quantiles(policy.slow_quantile, MIN_CALLS_FOR_RELATIVE)
            size = max(quantiles, default=-1) + 1
            thresholds = np.zeros(size, dtype=np.int64)
            for key, seconds in quantiles.items():
                thresholds[key] = int(seconds * 1e9)
            self._thresholds = thresholds
        keys = roots["key"].astype(np.int64)
        known = keys < self._thresholds.size
        threshold = np.zeros(roots.size, dtype=np.int64)
        threshold[known] = self._thresholds[keys[known]]
        return (threshold > 0) & (wall > threshold)

    def _over_budget(
        self, roots: np.ndarray, head: np.ndarray, tail: np.ndarray, child_roots: np.ndarray
    ) -> np.ndarray:
        """The tail-kept roots that the span budget refuses. A root costs one span plus one per
        record under it in this batch. Head-sampled roots spend the budget too, but are never
        refused: their trace is already partly exported."""
        bucket = self._bucket
        bucket.refill()
        ids, counts = np.unique(child_roots, return_counts=True)
        under = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        root_ids = roots["span_id"].tolist()
        for i in np.flatnonzero(head).tolist():
            bucket.tokens -= 1 + under.get(root_ids[i], 0)
        refused = np.zeros(roots.size, dtype=bool)
        for i in np.flatnonzero(tail).tolist():
            cost = 1 + under.get(root_ids[i], 0)
            if bucket.tokens >= 1.0:
                bucket.tokens -= cost
            else:
                refused[i] = True
                self.spans_dropped[DROP_RATE_LIMIT] += cost
        return refused

    def _hold(self, waiting: np.ndarray) -> None:
        """Keep records whose root is undecided for a later batch, within age and size limits."""
        end_ns = waiting["start_ns"] + waiting["wall_ns"]
        fresh = end_ns >= self._monotonic_ns() - int(_PENDING_MAX_AGE_S * 1e9)
        expired = int(waiting.size - np.count_nonzero(fresh))
        waiting = waiting[fresh]
        if waiting.size > _PENDING_MAX_ROWS:
            expired += waiting.size - _PENDING_MAX_ROWS
            waiting = waiting[-_PENDING_MAX_ROWS:]
        self.spans_dropped[DROP_UNRESOLVED] += expired
        self._pending = waiting.copy() if waiting.size else None

    def _forget(self, now: float) -> None:
        if len(self._kept) > 1024:
            horizon = now - _KEPT_MEMORY_S
            kept = {root: at for root, at in self._kept.items() if at >= horizon}
            if len(kept) > _KEPT_MAX:
                # Sampling everything at a high rate: the newest roots only (insertion order).
                kept = dict(itertools.islice(kept.items(), len(kept) - _KEPT_MAX, None))
            self._kept = kept

    # -- spans ------------------------------------------------------------------------------------

    def _describe(self, key: int) -> tuple[str, dict[str, Any], bool]:
        """(span name, attributes, whether it is a stage) of a key."""
        found = self._names.get(key)
        if found is None:
            info = self.registry.info(key)
            if info.kind == "stage":
                name = f"stage {info.stage}"
            else:
                name = f"inference {info.model}" if info.model else "inference"
            found = self._names[key] = (name, dict(info.metric_attributes), info.kind == "stage")
        return found

    def _emit(self, rows: np.ndarray, reasons: np.ndarray | None, offset_ns: int) -> None:
        if rows.size == 0:
            return
        # Children before parents is the order they closed in; sort by start for readable exports.
        order = np.argsort(rows["start_ns"], kind="stable")
        columns = {
            name: rows[name][order].tolist()
            for name in (
                "key",
                "error",
                "flags",
                "start_ns",
                "wall_ns",
                "cpu_ns",
                "trace_hi",
                "trace_lo",
                "span_id",
                "parent_id",
            )
        }
        counters = rows["counters"][order] if self._counters else None
        why = reasons[order].tolist() if reasons is not None else None
        on_end = self.processor.on_end
        store = self.exemplars.add
        with_exemplar = self.exemplars.newest_per_key(columns["key"])
        device_times = self._device_times
        for i, key in enumerate(columns["key"]):
            name, base, is_stage = self._describe(key)
            attributes = dict(base)
            flags = columns["flags"][i]
            error = columns["error"][i]
            wall_ns = columns["wall_ns"][i]
            cpu_ns = columns["cpu_ns"][i]
            if cpu_ns >= 0:
                attributes["inferscope.cpu.time"] = cpu_ns / 1e9
                attributes["inferscope.off_cpu.time"] = max(0, wall_ns - cpu_ns) / 1e9
            if counters is not None:
                attributes.update(self._counter_attributes(counters[i], is_stage))
            if flags & FLAG_ABANDONED:
                attributes["inferscope.abandoned"] = True
            if why is not None:
                attributes["inferscope.trace.kept"] = why[i]
            start = columns["start_ns"][i] + offset_ns
            end = start + wall_ns
            status, events = _UNSET, _NO_EVENTS
            if error:
                error_type = self.registry.error_name(error) or "_OTHER"
                attributes["error.type"] = error_type
                status = Status(StatusCode.ERROR, error_type)
                events = (Event("exception", {"exception.type": error_type, "exception.escaped": True}, end),)
            trace_id = (columns["trace_hi"][i] << 64) | columns["trace_lo"][i]
            span_id = columns["span_id"][i]
            if device_times:
                gpu_seconds = device_times.pop(span_id, None)
                if gpu_seconds is not None:
                    attributes["inferscope.gpu.time"] = gpu_seconds
            parent_id = columns["parent_id"][i]
            parent = (
                SpanContext(trace_id, parent_id, bool(flags & FLAG_PARENT_REMOTE), _SAMPLED)
                if parent_id
                else None
            )
            span = ReadableSpan(
                name=name,
                context=SpanContext(trace_id, span_id, False, _SAMPLED),
                parent=parent,
                resource=self.resource,
                attributes=attributes,
                events=events,
                kind=_INTERNAL,
                status=status,
                start_time=start,
                end_time=end,
                instrumentation_scope=self._scope,
            )
            on_end(span)
            self.spans_exported += 1
            if with_exemplar[i]:
                store(key, Exemplar({}, wall_ns / 1e9, end, span_id, trace_id))

    def _counter_attributes(self, slots: np.ndarray, is_stage: bool) -> Iterable[tuple[str, int]]:
        for metric in self._stage_counters if is_stage else self._counters:
            if metric.slot == SLOT_RSS_DELTA and slots[SLOT_RSS_SAMPLES] != 1:
                continue  # this call was not one of the sampled ones
            yield f"inferscope.{counter_label(metric)}", int(slots[metric.slot])

    def all_spans_dropped(self) -> dict[str, int]:
        """Spans dropped by reason: by sampling's budget and bookkeeping, and by the export queues."""
        totals = dict(self.spans_dropped)
        if self.queues:
            totals[DROP_QUEUE_FULL] = sum(queue.dropped for queue in self.queues)
            totals[DROP_EXPORT_FAILED] = sum(queue.failed for queue in self.queues)
        return totals

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self.processor.force_flush(timeout_millis))


class BoundedBatchSpanProcessor(SpanProcessor):
    """Batches ended spans and exports them from one thread, as the SDK's ``BatchSpanProcessor``
    does, but with a deadline on every wait.

    The SDK's processor (1.45) flushes in the caller's thread without a timeout and joins its
    thread on shutdown for up to 30 s, whatever the caller's budget: with a collector that is down,
    a 5 s shutdown took 35 s. Here ``force_flush`` and ``shutdown`` wait at most their timeout;
    when it runs out, the exporter is shut down, which aborts its retries and its call in flight,
    and what is still queued is counted as dropped. The queue is bounded (``max_queue_size``);
    spans that find it full are counted, never blocked on. The thread starts with the first span
    and sleeps while there is none.

    >>> processor = BoundedBatchSpanProcessor(exporter)  # doctest: +SKIP
    >>> processor.shutdown(timeout_millis=5000)  # doctest: +SKIP
    """

    def __init__(
        self,
        exporter: Any,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_millis: float = 5000,
    ) -> None:
        self.exporter = exporter
        self._max_queue_size = max_queue_size
        self._batch_size = max(1, min(max_export_batch_size, max_queue_size))
        self._delay_s = schedule_delay_millis / 1e3
        self._queue: deque[ReadableSpan] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abandoned = False  # the shutdown deadline passed: export nothing more
        self._flush_requested = 0
        self._flushed = 0
        #: Spans that found the queue full (or came after shutdown), and spans whose export failed.
        self.dropped = 0
        self.failed = 0
        self._log = exporter_log(exporter)
        _SPAN_QUEUES.add(self)  # one fork hook for all of them: configure() makes new ones

    @classmethod
    def from_environment(
        cls, exporter: Any, environ: Mapping[str, str] | None = None
    ) -> BoundedBatchSpanProcessor:
        """A processor sized as the SDK's would be: ``OTEL_BSP_SCHEDULE_DELAY``,
        ``OTEL_BSP_MAX_QUEUE_SIZE`` and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` apply (a value that is
        not a positive integer is ignored, as the SDK does)."""
        environ = os.environ if environ is None else environ

        def positive(name: str, default: int) -> int:
            try:
                value = int((environ.get(name) or "").strip())
            except ValueError:
                return default
            return value if value > 0 else default

        return cls(
            exporter,
            max_queue_size=positive("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
            max_export_batch_size=positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
            schedule_delay_millis=positive("OTEL_BSP_SCHEDULE_DELAY", 5000),
        )

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            if self._stopping or len(self._queue) >= self._max_queue_size:
                self.dropped += 1
                return
            self._queue.append(span)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="inferscope-spans", daemon=True)
                self._thread.start()
            if len(self._queue) >= self._batch_size:
                self._cond.notify_all()

    def _run(self) -> None:
        with OWN_THREADS.running():  # encoding and sending spans is inferscope's CPU
            self._run_batches()

    def _run_batches(self) -> None:
        while True:
            with self._cond:
                if not (
                    self._stopping
                    or len(self._queue) >= self._batch_size
                    or self._flush_requested > self._flushed
                ):
                    self._cond.wait(self._delay_s)
                generation, stopping = self._flush_requested, self._stopping
            self._export_queued()
            with self._cond:
                self._flushed = max(self._flushed, generation)
                self._cond.notify_all()
                if stopping:
                    return

    def _export_queued(self) -> None:
        while True:
            with self._cond:
                if self._abandoned:
                    self.dropped += len(self._queue)
                    self._queue.clear()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                with exporting_quietly(self.exporter):
                    ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception:
                ok = False
                self._log.warning(
                    "inferscope: the span exporter %s raised; its spans are counted as dropped "
                    "(logged at most once a minute)",
                    type(self.exporter).__name__,
                    exc_info=True,
                )
            if not ok:
                with self._cond:
                    self.failed += len(batch)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every span queued now; False when ``timeout_millis`` ran out first."""
        deadline = time.monotonic() + timeout_millis / 1e3
        with self._cond:
            if self._thread is None or self._stopping:
                return not self._queue
            self._flush_requested += 1
            target = self._flush_requested
            self._cond.notify_all()
            while self._flushed < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def begin_shutdown(self) -> None:
        """Refuse new spans and start exporting the queued ones; ``shutdown()`` waits for them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        """Export what is queued within ``timeout_millis``, then shut the exporter down; what
        could not be exported in time is counted as dropped. Never waits longer."""
        deadline = time.monotonic() + timeout_millis / 1e3
        # A slice of the budget is kept for the thread to end once the exporter is shut down.
        reserve_s = min(timeout_millis / 1e3 * _SHUTDOWN_RESERVE, _SHUTDOWN_RESERVE_MAX_S)
        self.begin_shutdown()
        thread = self._thread
        own = thread is not None and thread is not threading.current_thread()
        if own:
            thread.join(max(0.0, deadline - reserve_s - time.monotonic()))  # type: ignore[union-attr]
        with self._cond:
            self._abandoned = True
            self.dropped += len(self._queue)
            self._queue.clear()
        try:
            # Aborts the exporter's retries and cancels its call in flight, so that the thread
            # ends now rather than at the exporter's own timeout.
            self.exporter.shutdown()
        except Exception:
            self._log.warning("inferscope: shutting down the span exporter failed", exc_info=True)
        if own:
            thread.join(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]

    def _after_fork_in_child(self) -> None:
        # The parent's thread and its lock do not exist in the child; the child exports its own.
        self._cond = threading.Condition(threading.Lock())
        self._queue = deque()
        self._thread = None
        self._flush_requested = self._flushed = 0


_SPAN_QUEUES: weakref.WeakSet[BoundedBatchSpanProcessor] = weakref.WeakSet()


def _span_queues_after_fork_in_child() -> None:
    for queue in list(_SPAN_QUEUES):
        queue._after_fork_in_child()


os.register_at_fork(after_in_child=_span_queues_after_fork_in_child)


# -- context propagation ------------------------------------------------------------------------


class TracingRuntimeContext(_otel_compat.RuntimeContextBase):
    """OTel's runtime context, plus inferscope's open spans.

    ``get_current()`` returns the wrapped context, except when the innermost open inferscope entry
    opened under exactly that context: then the entry is the current span, and a context with it
    (a ``NonRecordingSpan`` with its ids) is returned, unless the entry was not sampled at its start
    and that context's span was (inferscope never unsamples the application's trace). ``attach``
    and ``detach`` are the wrapped ones', so the application's own spans nest as they always do.
    """

    def __init__(self, inner: ContextVarsRuntimeContext, current_span: Callable[[], Any]) -> None:
        self.inner = inner
        self._current_span = current_span

    def attach(self, context: Context) -> Token[Context]:
        return self.inner.attach(context)

    def detach(self, token: Token[Context]) -> None:
        self.inner.detach(token)

    def get_current(self) -> Context:
        context = self.inner.get_current()
        try:
            top = self._current_span()
            if top is None or top[4] != id(context):
                return context
            trace_hi, trace_lo, span_id, flags, _ = top
            if not flags & FLAG_SAMPLED and get_current_span(context).get_span_context().trace_flags.sampled:
                # An entry not kept at its start under a sampled span (sampler traceidratio):
                # the application's spans stay in their trace, as children of that span.
                return context
            span_context = SpanContext(
                (trace_hi << 64) | trace_lo,
                span_id,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if flags & FLAG_SAMPLED else TraceFlags.DEFAULT),
            )
            return set_span_in_context(NonRecordingSpan(span_context), context)
        except Exception:
            return context


def install_runtime_context(current_span: Callable[[], Any]) -> tuple[Any, str] | None:
    """Wrap OTel's runtime context; returns (its ContextVar, the span key) for the hot path, or None
    (logged) when the runtime context is not the contextvars one and cannot be followed."""
    runtime = _otel_compat.runtime_context()
    if isinstance(runtime, TracingRuntimeContext):
        runtime = runtime.inner
    var = _otel_compat.runtime_context_var(runtime)
    if not isinstance(runtime, ContextVarsRuntimeContext) or var is None:
        _logger.warning(
            "inferscope: tracing is off: the OTel runtime context is %s, not the contextvars one",
            type(runtime).__name__,
        )
        return None
    _otel_compat.set_runtime_context(TracingRuntimeContext(runtime, current_span))
    return var, _otel_compat.SPAN_KEY


def uninstall_runtime_context() -> None:
    runtime = _otel_compat.runtime_context()
    if isinstance(runtime, TracingRuntimeContext):
        _otel_compat.set_runtime_context(runtime.inner)
