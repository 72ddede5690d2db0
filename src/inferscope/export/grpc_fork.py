"""OTLP over gRPC across ``fork()``: a child never uses gRPC that a fork left broken.

gRPC can be used in a forked child only when no thread was inside a gRPC call at ``fork()``: its
fork handlers then stop its threads before the fork and start them again in the child. When a
thread was, gRPC skips its handlers (it logs "Other threads are currently calling into gRPC,
skipping fork() handlers"), and the child inherits the bookkeeping of threads it does not have.
A channel made in such a child crashes it (SIGSEGV in one of gRPC's threads) or hangs it: 1 to 2
children in 300 did, forked under four recording threads while inferscope exported to a closed
port over gRPC.

So every gRPC call of the OTLP exporters that inferscope builds (making the channel, the export
calls, closing the channel) goes through :data:`GRPC_CALLS`:

- before ``fork()``, new calls wait until the fork is done (at most ``CALL_WAIT_S``), and the fork
  waits at most ``FORK_WAIT_S`` for the calls in flight to end: an export to a collector that
  answers takes milliseconds;
- a child forked while a call was still in flight (a collector that accepts and never answers,
  say) marks gRPC unusable (:attr:`GrpcCalls.usable`) and so do its own children. Its OTLP/gRPC
  exporters are then :class:`UnusableMetricExporter` and :class:`UnusableSpanExporter`: every
  export fails, and is counted as a failed export (``inferscope.sdk.exports.failed``; spans as
  dropped with reason ``export_failed``), and one error line says why and what to do.

The parent's gRPC exporters are never used in the child (their wrappers are detached) and are kept
referenced there, so that no channel is ever closed or freed by a child (_pipeline.py).

gRPC calls of the application's own channels are not seen here: a fork during one of them leaves
gRPC as unusable in the child, and this module cannot tell.

Example::

    exporter = gated(OTLPMetricExporter)(endpoint="http://collector:4317")  # as _pipeline builds it
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .. import _otel_compat

__all__ = [
    "CALL_WAIT_S",
    "FORK_WAIT_S",
    "GRPC_CALLS",
    "GrpcCalls",
    "UnusableMetricExporter",
    "UnusableSpanExporter",
    "gated",
]

_logger = logging.getLogger("inferscope")
_T = TypeVar("_T", bound=type)

#: How long ``fork()`` waits for inferscope's gRPC calls in flight to end.
FORK_WAIT_S = 0.5
#: How long a gRPC call waits for a ``fork()`` in progress to be done.
CALL_WAIT_S = 2.0


class GrpcCalls:
    """Counts the threads inside a gRPC call of inferscope's exporters, and holds calls off while
    the process forks. Reentrant: a call made inside another (the exporter's constructor makes its
    channel) counts once."""

    def __init__(self, *, fork_wait_s: float = FORK_WAIT_S, call_wait_s: float = CALL_WAIT_S) -> None:
        self.fork_wait_s = fork_wait_s
        self.call_wait_s = call_wait_s
        self._cond = threading.Condition(threading.Lock())
        self._depth = threading.local()
        self._active = 0
        self._forking = False
        self._active_at_fork = 0
        #: False in a process forked while one of these calls was in flight, and in its children.
        self.usable = True

    @property
    def active(self) -> int:
        """Threads inside a call now."""
        return self._active

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        depth: int = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._cond:
                if self._forking:
                    self._cond.wait_for(lambda: not self._forking, self.call_wait_s)
                self._active += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            # A fork from inside a call (the forking thread's own) cannot wait for that one.
            own = 1 if getattr(self._depth, "value", 0) else 0
            self._cond.wait_for(lambda: self._active <= own, self.fork_wait_s)
            self._active_at_fork = self._active - own

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # Only the forking thread survives fork(): the lock may be held by a thread that is gone.
        self._cond = threading.Condition(threading.Lock())
        self._forking = False
        self._active = 1 if getattr(self._depth, "value", 0) else 0
        if self._active_at_fork:
            self.usable = False


#: The one gate of the process.
GRPC_CALLS = GrpcCalls()

os.register_at_fork(
    before=GRPC_CALLS.before_fork,
    after_in_parent=GRPC_CALLS.after_fork_in_parent,
    after_in_child=GRPC_CALLS.after_fork_in_child,
)


@functools.cache
def gated(cls: _T) -> _T:
    """``cls`` (an OTLP gRPC exporter class) whose channel and calls go through :data:`GRPC_CALLS`."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with GRPC_CALLS.call():
            cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
            _otel_compat.gate_grpc_exporter(self, _gate)

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if hasattr(cls, _otel_compat.GRPC_RECONNECT):
        # The exporter makes a new channel after an UNAVAILABLE answer: gate that one too.
        def reconnect(self: Any) -> None:
            with GRPC_CALLS.call():
                getattr(cls, _otel_compat.GRPC_RECONNECT)(self)
                _otel_compat.gate_grpc_exporter(self, _gate)

        namespace[_otel_compat.GRPC_RECONNECT] = reconnect
    return type(cls.__name__, (cls,), namespace)  # type: ignore[return-value]


_explained = False
_explained_lock = threading.Lock()


def _explain() -> None:
    global _explained
    with _explained_lock:
        if _explained:
            return
        _explained = True
    _logger.error(
        "inferscope: this process was forked while an OTLP/gRPC export was in flight, and gRPC "
        "cannot be used in a process forked then (gRPC skips its fork handlers): its metrics and "
        "spans are not exported over OTLP, and each export is counted as failed. Configure "
        "inferscope in the workers, after the fork (gunicorn's post_fork hook), so that the "
        "process that forks never exports; or set otlp_protocol (OTEL_EXPORTER_OTLP_PROTOCOL) "
        "to http/protobuf."
    )


def _reset_explained_after_fork() -> None:
    global _explained, _explained_lock
    _explained, _explained_lock = False, threading.Lock()  # said once in each process


os.register_at_fork(after_in_child=_reset_explained_after_fork)


class UnusableMetricExporter(MetricExporter):
    """The OTLP/gRPC metric exporter of a process where gRPC cannot be used: every export fails."""

    def __init__(self) -> None:
        super().__init__()
        _explain()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


class UnusableSpanExporter(SpanExporter):
    """The OTLP/gRPC span exporter of a process where gRPC cannot be used: every export fails."""

    def __init__(self) -> None:
        _explain()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        return None


def _gate(target: Any) -> Any:
    """``target`` (a channel or stub) whose methods run inside ``GRPC_CALLS.call()``."""
    return target if isinstance(target, GatedCalls) else GatedCalls(target, GRPC_CALLS.call)


class GatedCalls:
    """A proxy of a gRPC channel or stub: each method it hands out runs inside ``call()``."""

    __slots__ = ("_call", "_target")

    def __init__(self, target: Any, call: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._target = target
        self._call = call

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value
        call = self._call

        def gated_call(*args: Any, **kwargs: Any) -> Any:
            with call():
                return value(*args, **kwargs)

        return gated_call
