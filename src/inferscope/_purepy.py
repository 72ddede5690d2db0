"""The pure-Python backend: the same names, semantics and errors as ``inferscope._native``.

It is a product path, not a stub: CI runs the whole suite on it (``INFERSCOPE_NO_EXTENSION=1``) and
benchmarks/overhead.py measures it. See ``_native/__init__.pyi`` for the contract.

Differences in mechanism (not in behaviour) from the C backend:
- The ring is a ``deque`` with a capacity check. ``append`` and ``popleft`` are atomic under the
  GIL, so producers take no lock; the check may overshoot the capacity by one record per thread
  that is between the check and the append at the same moment.
- Open entries form a linked list whose head lives in a ``ContextVar``; every enter and exit sets
  it. There is no ``Context`` identity to compare in pure Python, and the copy that asyncio makes
  of the context per task gives each task its own head, which is what frames do in C.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import operator
import os
import random
import resource
import threading
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns as monotonic_ns  # CLOCK_MONOTONIC on Linux, the clock the C backend reads
from time import thread_time_ns as thread_cpu_ns
from typing import Any, Literal

import numpy as np

from ._records import (
    COUNTER_CUDA_MEMORY,
    COUNTER_PERF,
    COUNTER_PY_HEAP,
    COUNTER_RSS,
    COUNTER_RUSAGE,
    COUNTER_SLOTS,
    COUNTER_THREAD_CPU,
    FLAG_ABANDONED,
    FLAG_PARENT_REMOTE,
    FLAG_SAMPLED,
    FLAG_TRACED,
    MAX_STACK_DEPTH,
    MAX_STAGE_NAME_LENGTH,
    NO_ERROR,
    NO_MODEL_KEY,
    OTHER_ERROR,
    RECORD_DTYPE,
    RSS_SAMPLE_EVERY,
    SLOT_CUDA_ALLOCATED_DELTA,
    SLOT_CUDA_PEAK,
    SLOT_INVOLUNTARY_SWITCHES,
    SLOT_MAJOR_FAULTS,
    SLOT_MINOR_FAULTS,
    SLOT_PY_HEAP_DELTA,
    SLOT_RSS_DELTA,
    SLOT_RSS_SAMPLES,
    SLOT_VOLUNTARY_SWITCHES,
    STAGE_CPU_EXACT_GAP_NS,
    STAGE_CPU_GAP_CAP_NS,
    STAGE_CPU_GAP_WEIGHT,
    STAGE_CPU_SAMPLE_EVERY,
)

__all__ = [
    "MAX_STACK_DEPTH",
    "RECORD_SIZE",
    "Ring",
    "Runtime",
    "Stage",
    "monotonic_ns",
    "perf_status",
    "read_counters",
    "thread_cpu_ns",
]

RECORD_SIZE = RECORD_DTYPE.itemsize
_MAX_CAPACITY = 1 << 26
_STAGE_CACHE_LIMIT = 10000
_TUPLE_DTYPE = np.dtype(
    [
        ("key", "<u4"),
        ("error", "<u2"),
        ("flags", "<u2"),
        ("start_ns", "<i8"),
        ("wall_ns", "<i8"),
        ("cpu_ns", "<i8"),
    ]
)
_TRACE_FIELDS = ("trace_hi", "trace_lo", "span_id", "parent_id", "root_id")


class _ThreadCounter:
    """An exact counter without a lock: each thread increments only its own cell."""

    def __init__(self) -> None:
        self._cells: dict[int, list[int]] = {}

    def add(self) -> None:
        ident = threading.get_ident()
        cell = self._cells.get(ident)
        if cell is None:
            cell = self._cells.setdefault(ident, [0])
        cell[0] += 1

    @property
    def value(self) -> int:
        return sum(cell[0] for cell in list(self._cells.values()))

    def reset(self) -> None:
        self._cells = {}


class Ring:
    """Ring(capacity): bounded multi-producer ring of fixed-size records."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"Ring capacity must be an int, got {capacity!r}")
        if capacity < 2 or capacity > _MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(
                f"Ring capacity must be a power of two from 2 to {_MAX_CAPACITY}, got {capacity}"
            )
        self._capacity = capacity
        self._half = capacity // 2
        self._queue: deque[tuple[Any, ...]] = deque()
        self._dropped = _ThreadCounter()
        self._wake_fd = -1
        self._wake_sent = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def wake_fd(self) -> int:
        """A non-blocking pipe's write end: one byte is written to it once the ring is half full,
        once per drain (-1: nobody to wake)."""
        return self._wake_fd

    @wake_fd.setter
    def wake_fd(self, fd: int) -> None:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < -1:
            raise ValueError(f"wake_fd must be a file descriptor or -1, got {fd!r}")
        self._wake_sent = False
        self._wake_fd = fd

    @property
    def dropped(self) -> int:
        return self._dropped.value

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, key: int, error: int, flags: int, start_ns: int, wall_ns: int, cpu_ns: int, /) -> bool:
        if key < 0 or key > _U32 or error < 0 or error > _U16 or flags < 0 or flags > _U16:
            raise OverflowError("key must fit 32 bits, error and flags 16 bits")
        return self._push((key, error, flags, start_ns, wall_ns, cpu_ns))

    def _push(self, record: tuple[Any, ...]) -> bool:
        queue = self._queue
        if len(queue) >= self._capacity:
            self._dropped.add()
            return False
        queue.append(record)
        if len(queue) >= self._half and not self._wake_sent and self._wake_fd >= 0:
            self._wake_sent = True
            with contextlib.suppress(OSError):  # a full pipe already means a wake-up is pending
                os.write(self._wake_fd, b"\x01")
        return True

    def drain(self, out: Any, /) -> int:
        view = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=RECORD_DTYPE)
        if view.dtype != RECORD_DTYPE:
            view = view.view(RECORD_DTYPE)
        popleft = self._queue.popleft
        self._wake_sent = False
        batch = []
        try:
            for _ in range(len(view)):
                batch.append(popleft())
        except IndexError:
            pass
        n = len(batch)
        if n:
            # A record carries a 7th element, the counter slots (or None), when extra counters or
            # tracing are on, and an 8th, its trace ids (see Runtime._trace_open), when traced.
            long = [i for i, record in enumerate(batch) if len(record) > 6]
            with_counters = [i for i in long if batch[i][6] is not None]
            slots = [batch[i][6] for i in with_counters]  # type: ignore[misc]
            traced = [i for i in long if len(batch[i]) == 8]
            ids = [batch[i][7][:5] for i in traced]  # type: ignore[misc]
            for i in long:
                batch[i] = batch[i][:6]
            columns = np.array(batch, dtype=_TUPLE_DTYPE)
            target = view[:n]
            for name in _TUPLE_DTYPE.names or ():
                target[name] = columns[name]
            target["counters"] = 0
            if with_counters:
                target["counters"][with_counters] = slots
            for name in _TRACE_FIELDS:
                target[name] = 0
            if traced:
                values = np.array(ids, dtype=np.uint64).reshape(len(traced), 5)
                for column, name in enumerate(_TRACE_FIELDS):
                    target[name][traced] = values[:, column]
        return n

    def reset(self) -> None:
        self._queue.clear()
        self._dropped.reset()
        self._wake_fd = -1
        self._wake_sent = False


# An open inference or stage is a list, not an object: building a list is several times cheaper
# than calling a class, and this is the hot path of the pure-Python backend.
# [owner, key, parent entry, depth, fork generation, start_ns, cpu_ns, overflow, extra, trace]
# where extra is None, or (counter mask, start values) when counters beyond the CPU clock are on,
# and trace is None, or the entry's ids while tracing is on (see Runtime._trace_open).
_Entry = list[Any]
_OWNER, _KEY, _PARENT, _DEPTH, _GEN, _START, _CPU, _OVERFLOW, _EXTRA, _TRACE = range(10)
# The fields of a trace tuple, in the order of TraceIds in ringbuf.c.
_T_HI, _T_LO, _T_SPAN, _T_PARENT, _T_ROOT, _T_CTX, _T_FLAGS = range(7)
_U64 = (1 << 64) - 1
_EXTRA_COUNTERS = COUNTER_RUSAGE | COUNTER_PERF | COUNTER_RSS | COUNTER_PY_HEAP | COUNTER_CUDA_MEMORY
#: What a stage reads beyond the clocks: the CUDA allocator is read around inferences only.
_STAGE_EXTRA_COUNTERS = _EXTRA_COUNTERS & ~COUNTER_CUDA_MEMORY


class _Counters:
    """The counters beyond the CPU clock, read the way _native/counters.h reads them. perf events
    need the C extension: their slots stay 0 here (``perf_status()`` says so)."""

    def __init__(self) -> None:
        self._statm_fd = -1
        self._statm_pid = -1
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def read(self, mask: int, heap_reader: Callable[[], int] | None) -> tuple[int, list[int]]:
        """(-1, slot values) for one end of an entry: CPU time comes from the thread clock here."""
        values = [0] * COUNTER_SLOTS
        if mask & COUNTER_RUSAGE:
            ru = resource.getrusage(_RUSAGE_THREAD)
            values[SLOT_VOLUNTARY_SWITCHES] = ru.ru_nvcsw
            values[SLOT_INVOLUNTARY_SWITCHES] = ru.ru_nivcsw
            values[SLOT_MINOR_FAULTS] = ru.ru_minflt
            values[SLOT_MAJOR_FAULTS] = ru.ru_majflt
        if mask & COUNTER_PY_HEAP and heap_reader is not None:
            values[SLOT_PY_HEAP_DELTA] = int(heap_reader())
        return -1, values

    def rss_sample_start(self) -> int:
        # One entry in RSS_SAMPLE_EVERY, at random: a fixed stride would always hit the same stage.
        return self.rss_bytes() if random.randrange(RSS_SAMPLE_EVERY) == 0 else -1

    def rss_bytes(self) -> int:
        if self._statm_pid != os.getpid():  # fork(): the parent's fd reads the parent's statm
            if self._statm_fd >= 0:
                os.close(self._statm_fd)
            self._statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            self._statm_pid = os.getpid()
        return int(os.pread(self._statm_fd, 96, 0).split()[1]) * self._page_size

    def delta(
        self, mask: int, start: list[int], end: list[int], cuda: Callable[[bool], tuple[int, int] | None]
    ) -> list[int]:
        out = [0] * COUNTER_SLOTS
        if mask & COUNTER_RUSAGE:
            for slot in range(SLOT_VOLUNTARY_SWITCHES, SLOT_MAJOR_FAULTS + 1):
                out[slot] = end[slot] - start[slot]
        if mask & COUNTER_RSS and start[SLOT_RSS_SAMPLES] >= 0:
            out[SLOT_RSS_DELTA] = self.rss_bytes() - start[SLOT_RSS_SAMPLES]
            out[SLOT_RSS_SAMPLES] = 1
        if mask & COUNTER_PY_HEAP:
            out[SLOT_PY_HEAP_DELTA] = end[SLOT_PY_HEAP_DELTA] - start[SLOT_PY_HEAP_DELTA]
        if mask & COUNTER_CUDA_MEMORY and start[SLOT_CUDA_PEAK] >= 0:
            now = cuda(False)
            if now is not None:
                allocated, peak = now
                out[SLOT_CUDA_ALLOCATED_DELTA] = allocated - start[SLOT_CUDA_ALLOCATED_DELTA]
                out[SLOT_CUDA_PEAK] = max(peak - start[SLOT_CUDA_ALLOCATED_DELTA], 0)
        return out


_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
_COUNTERS = _Counters()


def perf_status() -> tuple[str, int, bool]:
    """perf events are read in C only: this backend reports them as unavailable."""
    return "none", errno.ENOSYS, False


def read_counters(mask: int, /) -> tuple[int, tuple[int, ...]]:
    """What one entry would read for ``mask``; for ``inferscope doctor``."""
    cpu, values = _COUNTERS.read(mask, None)
    if mask & COUNTER_THREAD_CPU:
        cpu = thread_cpu_ns()
    if mask & COUNTER_RSS:
        values[SLOT_RSS_DELTA] = _COUNTERS.rss_bytes()
    return cpu, tuple(values)


_ROOT_OWNER = object()
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF


def _check_field(value: int, limit: int, what: str) -> None:
    """A record's key or flags must fit its field, as in ``Ring.push``: never truncated into another."""
    if not 0 <= value <= limit:
        raise OverflowError(f"{what} must fit {limit.bit_length()} bits, got {value}")


# random's generator is reseeded in a forked child, so a child never repeats its parent's ids.
_getrandbits = random.getrandbits
_random = random.random
#: A key's stage entries so far, for the stage CPU sample: none yet, and read on every entry until
#: its rate says otherwise.
_NEW_KEY_GAPS = (-(2**62), STAGE_CPU_GAP_CAP_NS)


class Stage:
    """A pipeline stage: a context manager and a decorator. Get one with inferscope.stage(name)."""

    __slots__ = ("__weakref__", "_cache", "_epoch", "_runtime", "name")

    def __init__(self, runtime: Runtime, name: str) -> None:
        self._runtime = runtime
        self.name = name
        self._cache: dict[int, int] = {}
        self._epoch = runtime._epoch

    def __repr__(self) -> str:
        return f"<inferscope stage {self.name!r}>"

    def _key(self, parent: int) -> int:
        if self._epoch != self._runtime._epoch:
            self._cache = {}
            self._epoch = self._runtime._epoch
        key = self._cache.get(parent)
        if key is None:
            key = int(self._runtime.registry.stage_key(parent, self.name))
            self._cache[parent] = key
        return key

    def __enter__(self) -> Stage:
        rt = self._runtime
        if rt.enabled:
            try:
                var = rt._var
                top = var.get()
                generation = rt._generation
                if top is not None and top[_GEN] != generation:
                    top = None
                parent = NO_MODEL_KEY if top is None else top[_KEY]
                key = self._cache.get(parent) if self._epoch == rt._epoch else None
                if key is None:
                    key = self._key(parent)
                mask = rt.counters
                if mask & COUNTER_THREAD_CPU and rt._cpu_sample_every > 1:
                    # The stage CPU sample: read while the key's mean gap between entries is
                    # the exact gap or more, else one entry in cpu_sample_every at random (as
                    # ringbuf.c, which reads the coarse clock for the gaps).
                    now = monotonic_ns()
                    last, mean_gap = rt._stage_gaps.get(key, _NEW_KEY_GAPS)
                    mean_gap += int(
                        (min(max(now - last, 0), STAGE_CPU_GAP_CAP_NS) - mean_gap) / STAGE_CPU_GAP_WEIGHT
                    )
                    rt._stage_gaps[key] = (now, mean_gap)
                    if mean_gap < STAGE_CPU_EXACT_GAP_NS and _random() * rt._cpu_sample_every >= 1.0:
                        mask &= ~COUNTER_THREAD_CPU
                # Runtime._open(), inlined for the common case: no counters beyond the clocks.
                if mask & _STAGE_EXTRA_COUNTERS or (top is not None and top[_DEPTH] >= MAX_STACK_DEPTH):
                    rt._open(self, key, top, mask=mask)
                else:
                    trace = rt._trace_open(top) if rt._trace_var is not None else None
                    entry = [
                        self,
                        key,
                        top,
                        1 if top is None else top[_DEPTH] + 1,
                        generation,
                        0,
                        -1,
                        0,
                        None,
                        trace,
                    ]
                    var.set(entry)
                    # The clocks last, the CPU clock just before the wall clock (see _open()).
                    if mask & COUNTER_THREAD_CPU:
                        entry[_CPU] = thread_cpu_ns()
                    entry[_START] = monotonic_ns()
            except Exception:
                rt._internal_errors.add()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object, /) -> Literal[False]:
        rt = self._runtime
        if rt.enabled:
            end_ns = monotonic_ns()
            var = rt._var
            top = var.get()
            # The CPU clock only where the entry read it at its start (the stage CPU sample).
            if not rt.counters & COUNTER_THREAD_CPU:
                cpu_end = -1
            elif top is not None and top[_OWNER] is self and not top[_OVERFLOW]:
                cpu_end = thread_cpu_ns() if top[_CPU] >= 0 else -1
            else:
                cpu_end = thread_cpu_ns() if rt._exit_reads_cpu(self, top) else -1
            if (
                exc_type is None
                and top is not None
                and top[_OWNER] is self
                and top[_EXTRA] is None
                and not top[_OVERFLOW]
                and top[_GEN] == rt._generation
            ):
                # Runtime._close(), inlined for the common case.
                var.set(top[_PARENT])
                start = top[_START]
                wall = end_ns - start
                cpu = cpu_end - top[_CPU] if top[_CPU] >= 0 and cpu_end >= 0 else -1
                if cpu > wall:  # see _close()
                    cpu = wall
                trace = top[_TRACE]
                if trace is None:
                    rt._ring._push((top[_KEY], NO_ERROR, 0, start, wall, cpu))
                else:
                    flags = trace[_T_FLAGS]
                    rt._ring._push((top[_KEY], NO_ERROR, flags, start, wall, cpu, None, trace))
            elif exc_type is GeneratorExit:
                # The generator it was open in was closed before it finished: abandoned, no error.
                rt._close(self, None, FLAG_ABANDONED, end_ns, cpu_end)
            else:
                rt._close(self, exc_type, 0, end_ns, cpu_end)
        return False

    def __call__(self, func: Callable[..., Any], /) -> Callable[..., Any]:
        decorate = self._runtime.decorate
        if decorate is None:
            raise TypeError("stage objects are not callable here")
        result: Callable[..., Any] = decorate(self, func)
        return result


class Runtime:
    """Runtime(ring, registry): the hot-path state shared by every tracked call and stage."""

    def __init__(self, ring: Ring, registry: Any) -> None:
        if not isinstance(ring, Ring):
            raise TypeError(f"Runtime() argument 'ring' must be a Ring, not {type(ring).__name__}")
        self._ring = ring
        self._registry = registry
        self.decorate: Callable[..., Any] | None = None
        self.heap_reader: Callable[[], int] | None = None
        self.cuda_reader: Callable[[bool], tuple[int, int] | None] | None = None
        self.device_stage: Callable[[Stage, object], Any] | None = None
        self.counters = 0
        self.enabled = True
        self._var: contextvars.ContextVar[_Entry | None] = contextvars.ContextVar(
            "inferscope_entry", default=None
        )
        self._stages: dict[str, Stage] = {}
        self._generation = 0
        self._epoch = 0
        self._depth_dropped = _ThreadCounter()
        self._internal_errors = _ThreadCounter()
        self._trace_var: contextvars.ContextVar[Any] | None = None
        self._span_key = ""
        self._cpu_sample_every = STAGE_CPU_SAMPLE_EVERY
        self._stage_gaps: dict[int, tuple[int, int]] = {}  # key -> (last entry, mean gap), ns
        self._ratio_bound = 0
        self._parent_based = True

    # -- attributes with the same names and checks as the C type --------------------------------

    @property
    def ring(self) -> Ring:
        return self._ring

    @ring.setter
    def ring(self, value: Ring) -> None:
        if not isinstance(value, Ring):
            raise TypeError("ring must be a Ring")
        self._ring = value

    @property
    def registry(self) -> Any:
        return self._registry

    @registry.setter
    def registry(self, value: Any) -> None:
        self._registry = value
        self._epoch += 1

    @property
    def tracing(self) -> bool:
        return self._trace_var is not None

    @property
    def depth_dropped(self) -> int:
        return self._depth_dropped.value

    @property
    def internal_errors(self) -> int:
        return self._internal_errors.value

    # -- frames -----------------------------------------------------------------------------------

    def _top(self) -> _Entry | None:
        top = self._var.get()
        if top is not None and top[_GEN] != self._generation:
            return None
        return top

    @property
    def cpu_sample_every(self) -> int:
        return self._cpu_sample_every

    @cpu_sample_every.setter
    def cpu_sample_every(self, value: int) -> None:
        value = operator.index(value)
        if not 1 <= value <= 2**31 - 1:
            raise ValueError("cpu_sample_every must be a positive integer")
        self._cpu_sample_every = value

    def _exit_reads_cpu(self, owner: object, top: _Entry | None) -> bool:
        """Whether the entry that ``owner`` closes next read the thread CPU clock at its start."""
        if top is None or top[_OVERFLOW]:
            return False  # nothing open, or absorbed: nothing is recorded
        node: _Entry | None = top
        while node is not None and node[_OWNER] is not owner:
            node = node[_PARENT]
        return node is not None and node[_CPU] >= 0

    def _open(
        self, owner: object, key: int, top: _Entry | None, inference: bool = False, mask: int | None = None
    ) -> None:
        """Opens an entry. Only an outermost inference reads the CUDA allocator: not a stage, and
        not an inference inside another (its peak reset would cut the outer one's peak short)."""
        depth = 1 if top is None else top[_DEPTH] + 1
        if depth > MAX_STACK_DEPTH:
            assert top is not None
            top[_OVERFLOW] += 1
            self._depth_dropped.add()
            return
        if mask is None:
            mask = self.counters
        mask = mask if inference and top is None else mask & ~COUNTER_CUDA_MEMORY
        extra = None
        cpu = -1
        if mask & _EXTRA_COUNTERS:
            cpu, values = _COUNTERS.read(mask, self.heap_reader)
            if mask & COUNTER_RSS:
                values[SLOT_RSS_SAMPLES] = _COUNTERS.rss_sample_start()
            if mask & COUNTER_CUDA_MEMORY:
                # A peak of -1 marks an entry opened while CUDA was not in use: nothing to subtract.
                values[SLOT_CUDA_ALLOCATED_DELTA], values[SLOT_CUDA_PEAK] = self._cuda_read(True) or (0, -1)
            extra = (mask, values)
        trace = self._trace_open(top) if self._trace_var is not None else None
        entry = [owner, key, top, depth, self._generation, 0, cpu, 0, extra, trace]
        self._var.set(entry)
        # The clocks are read last, so that our own bookkeeping stays outside the window, and the
        # CPU clock right before the wall clock, so that the CPU window adds no bookkeeping either.
        if mask & COUNTER_THREAD_CPU:
            entry[_CPU] = thread_cpu_ns()
        entry[_START] = monotonic_ns()

    def _close(
        self, owner: object, exc_type: type[BaseException] | None, flags: int, end_ns: int, cpu_end: int
    ) -> None:
        try:
            entry = self._take(owner)
            if entry is None:
                return
            error = NO_ERROR if exc_type is None else self._error_id(exc_type)
            extra = entry[_EXTRA]
            trace = entry[_TRACE]
            cpu = cpu_end - entry[_CPU] if entry[_CPU] >= 0 and cpu_end >= 0 else -1
            start_ns = entry[_START]
            if cpu > end_ns - start_ns:
                # One thread cannot spend more CPU than wall time. The CPU window is a little
                # wider than the wall window (its reads sit just outside it) and the two clocks
                # run at slightly different rates, so a tiny call could read above 1 otherwise.
                cpu = end_ns - start_ns
            if extra is None and trace is None:
                self._ring._push((entry[_KEY], error, flags, start_ns, end_ns - start_ns, cpu))
                return
            counters = None
            if extra is not None:
                mask, start = extra
                _, end = _COUNTERS.read(mask, self.heap_reader)
                counters = tuple(_COUNTERS.delta(mask, start, end, self._cuda_read))
            self._push(entry[_KEY], error, flags, start_ns, end_ns - start_ns, cpu, counters, trace)
        except Exception:
            self._internal_errors.add()

    def _cuda_read(self, start: bool) -> tuple[int, int] | None:
        """The CUDA allocator's (allocated, peak) bytes, resetting the peak at an inference's start;
        None when CUDA is not in use or the read failed (counted)."""
        reader = self.cuda_reader
        if reader is None:
            return None
        try:
            value = reader(start)
            if value is None:
                return None
            allocated, peak = value
            return int(allocated), int(peak)
        except Exception:
            self._internal_errors.add()
            return None

    def _push(
        self,
        key: int,
        error: int,
        flags: int,
        start_ns: int,
        wall_ns: int,
        cpu_ns: int,
        counters: tuple[int, ...] | None,
        trace: tuple[int, ...] | None,
    ) -> None:
        if trace is None:
            self._ring._push((key, error, flags, start_ns, wall_ns, cpu_ns, counters))
        else:
            flags |= trace[_T_FLAGS]
            self._ring._push((key, error, flags, start_ns, wall_ns, cpu_ns, counters, trace))

    # -- trace linkage (the C backend's trace_open) ------------------------------------------------

    def _trace_open(self, top: _Entry | None) -> tuple[int, ...] | None:
        """The ids of an entry opening under ``top``: see "Trace linkage" in ringbuf.c."""
        var = self._trace_var
        assert var is not None
        ctx = var.get()
        ctx_id = id(ctx)
        up = top[_TRACE] if top is not None else None
        root = up[_T_ROOT] if up is not None else 0
        parent = None if up is not None and up[_T_CTX] == ctx_id else self._parent_from_otel(ctx)
        if parent is not None:
            hi, lo, parent_id, parent_flags = parent
            sampled = parent_flags & FLAG_SAMPLED if self._parent_based else self._ratio_sampled(lo)
            flags = FLAG_TRACED | (parent_flags & FLAG_PARENT_REMOTE) | (FLAG_SAMPLED if sampled else 0)
        elif up is not None:
            hi, lo, parent_id = up[_T_HI], up[_T_LO], up[_T_SPAN]
            flags = FLAG_TRACED | (up[_T_FLAGS] & FLAG_SAMPLED)
        else:
            trace_id = _getrandbits(128) or 1
            hi, lo, parent_id = trace_id >> 64, trace_id & _U64, 0
            bound = self._ratio_bound
            flags = FLAG_TRACED | (FLAG_SAMPLED if bound == _U64 or lo < bound else 0)
        span = _getrandbits(64) or 1
        return (hi, lo, span, parent_id, root or span, ctx_id, flags)

    def _ratio_sampled(self, trace_lo: int) -> bool:
        return self._ratio_bound == _U64 or trace_lo < self._ratio_bound

    def _parent_from_otel(self, ctx: Any) -> tuple[int, int, int, int] | None:
        if not ctx:
            return None
        try:
            span = ctx.get(self._span_key)
            if span is None:
                return None
            sc = span.get_span_context()
            trace_id, span_id = int(sc[0]), int(sc[1])
            if not trace_id or not span_id:
                return None
            remote = FLAG_PARENT_REMOTE if sc[2] else 0
            flags = FLAG_TRACED | remote | (FLAG_SAMPLED if int(sc[3]) & 1 else 0)
            return (trace_id >> 64) & _U64, trace_id & _U64, span_id & _U64, flags
        except Exception:
            self._internal_errors.add()
            return None

    def set_tracing(
        self,
        var: contextvars.ContextVar[Any] | None,
        span_key: str | None = None,
        ratio_bound: int | None = None,
        parent_based: bool | None = None,
        /,
    ) -> None:
        if var is None and span_key is None:
            self._trace_var = None
            return
        if not isinstance(var, contextvars.ContextVar) or not isinstance(span_key, str):
            raise TypeError("set_tracing needs a ContextVar and a str key")
        if ratio_bound is None or parent_based is None:
            raise TypeError("set_tracing(var, span_key, ratio_bound, parent_based) or set_tracing(None)")
        if not 0 <= ratio_bound <= _U64:
            raise OverflowError("ratio_bound must fit 64 bits")
        self._span_key = span_key
        self._ratio_bound = int(ratio_bound)
        self._parent_based = bool(parent_based)
        self._trace_var = var

    def current_trace(self) -> tuple[int, ...] | None:
        top = self._top()
        return top[_TRACE] if top is not None else None

    def current_span(self) -> tuple[int, int, int, int, int] | None:
        trace = self.current_trace()
        if trace is None:
            return None
        return trace[_T_HI], trace[_T_LO], trace[_T_SPAN], trace[_T_FLAGS], trace[_T_CTX]

    def _take(self, owner: object) -> _Entry | None:
        top = self._var.get()
        if top is None:
            return None
        if top[_OVERFLOW]:
            top[_OVERFLOW] -= 1
            return None
        if top[_OWNER] is owner:
            self._var.set(top[_PARENT])
            return top if top[_GEN] == self._generation else None
        # Out of order: a generator yielded inside a stage. Unlink that entry in place.
        above = [top]
        node = top[_PARENT]
        while node is not None and node[_OWNER] is not owner:
            above.append(node)
            node = node[_PARENT]
        if node is None or node[_OWNER] is _ROOT_OWNER:
            return None
        above[-1][_PARENT] = node[_PARENT]
        for entry in above:
            entry[_DEPTH] -= 1
        return node if node[_GEN] == self._generation else None

    # -- the contract -----------------------------------------------------------------------------

    def track(self, func: Callable[..., Any], key: int, /) -> Callable[..., Any]:
        if not callable(func):
            raise TypeError(f"track() needs a callable, got {func!r}")
        if not isinstance(key, int) or key < 0 or key >= 0xFFFFFFFF:
            raise OverflowError("key must fit 32 bits")
        rt = self
        var = self._var

        def tracked(*args: Any, **kwargs: Any) -> Any:
            if not rt.enabled:
                return func(*args, **kwargs)
            # _open() and the common case of _close(), inlined: each call saved is ~50 ns here.
            entry: _Entry | None = None
            try:
                top = var.get()
                generation = rt._generation
                if top is not None and top[_GEN] != generation:
                    top = None
                if (top is None or top[_DEPTH] < MAX_STACK_DEPTH) and not rt.counters & _EXTRA_COUNTERS:
                    trace = rt._trace_open(top) if rt._trace_var is not None else None
                    depth = 1 if top is None else top[_DEPTH] + 1
                    entry = [tracked, key, top, depth, generation, 0, -1, 0, None, trace]
                    var.set(entry)
                    if rt.counters & COUNTER_THREAD_CPU:  # the clocks last (see _open())
                        entry[_CPU] = thread_cpu_ns()
                    entry[_START] = monotonic_ns()
                else:
                    rt._open(tracked, key, top, True)  # counters beyond the clocks, or the depth overflow
            except Exception:
                rt._internal_errors.add()
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                rt.exit(tracked, type(exc))
                raise
            end_ns = monotonic_ns()
            cpu_end = thread_cpu_ns() if rt.counters & COUNTER_THREAD_CPU else -1
            if (
                entry is not None
                and var.get() is entry
                and entry[_GEN] == rt._generation
                and not entry[_OVERFLOW]
                and entry[_EXTRA] is None
            ):
                var.set(entry[_PARENT])
                start = entry[_START]
                wall = end_ns - start
                cpu = cpu_end - entry[_CPU] if entry[_CPU] >= 0 and cpu_end >= 0 else -1
                if cpu > wall:  # see _close()
                    cpu = wall
                trace = entry[_TRACE]
                if trace is None:
                    rt._ring._push((key, NO_ERROR, 0, start, wall, cpu))
                else:
                    rt._ring._push((key, NO_ERROR, trace[_T_FLAGS], start, wall, cpu, None, trace))
            else:
                rt._close(tracked, None, 0, end_ns, cpu_end)
            return result

        tracked.inferscope_key = key  # type: ignore[attr-defined]
        return tracked

    def stage(self, name: str, /, *, device: object = None) -> Any:
        found = self._stages.get(name) if isinstance(name, str) else None
        if found is None:
            found = self._new_stage(name)
        if device is None:
            return found
        if self.device_stage is None:
            raise TypeError("stage(device=...) is not available here")
        return self.device_stage(found, device)

    def _new_stage(self, name: object) -> Stage:
        if not isinstance(name, str):
            if callable(name):
                raise TypeError(
                    'stage() needs a name: write @stage("preprocess"), not @stage '
                    "(did you forget the brackets and the name?)"
                )
            raise TypeError(f"stage name must be a str, got {name!r}")
        if not name:
            raise ValueError('stage name must not be empty, e.g. stage("preprocess")')
        if len(name) > MAX_STAGE_NAME_LENGTH:
            raise ValueError(
                f"stage name is {len(name)} characters long; at most {MAX_STAGE_NAME_LENGTH} are "
                f"accepted: {name[:40]!r}..."
            )
        if "/" in name:
            raise ValueError(
                f"stage name {name!r} must not contain '/': nest stages instead, the path is built for you"
            )
        created = Stage(self, name)
        if len(self._stages) < _STAGE_CACHE_LIMIT:
            self._stages[name] = created
        return created

    def enter(
        self,
        owner: object,
        key: int,
        stash: list[_Entry] | None = None,
        trace: tuple[int, ...] | None = None,
        /,
    ) -> None:
        _check_field(key, _U32, "key")
        if not self.enabled:
            return
        try:
            self._open(owner, key, self._top(), stash is None and trace is None)
            opened = self._var.get()
            ctx_id = None
            if opened is not None and opened[_OWNER] is owner and opened[_TRACE] is not None:
                ctx_id = opened[_TRACE][_T_CTX]
                if trace is not None:
                    # The span this generator had; the OTel context of this resumption.
                    opened[_TRACE] = (*trace[:_T_CTX], ctx_id, trace[_T_FLAGS])
            if stash:
                self._reopen(stash, ctx_id)
        except Exception:
            self._internal_errors.add()

    def _reopen(self, stash: list[_Entry], ctx_id: int | None) -> None:
        top = self._var.get()
        for entry in stash:  # outermost first
            depth = 1 if top is None else top[_DEPTH] + 1
            if depth > MAX_STACK_DEPTH:
                assert top is not None
                top[_OVERFLOW] += 1
                self._depth_dropped.add()
                continue
            entry[_PARENT], entry[_DEPTH], entry[_OVERFLOW] = top, depth, 0
            trace = entry[_TRACE]
            if trace is not None and ctx_id is not None:
                entry[_TRACE] = (*trace[:_T_CTX], ctx_id, trace[_T_FLAGS])
            top = entry
        self._var.set(top)

    def exit(self, owner: object, exc_type: type[BaseException] | None, flags: int = 0, /) -> None:
        if flags:
            _check_field(flags, _U16, "flags")
        if not self.enabled:
            return
        end_ns = monotonic_ns()
        cpu_end = thread_cpu_ns() if self.counters & COUNTER_THREAD_CPU else -1
        self._close(owner, exc_type, flags, end_ns, cpu_end)

    def exit_segment(
        self, owner: object, /
    ) -> tuple[int, int, int, list[_Entry] | None, tuple[int, ...] | None] | None:
        if not self.enabled:
            return None
        end_ns = monotonic_ns()
        cpu_end = thread_cpu_ns() if self.counters & COUNTER_THREAD_CPU else -1
        top = self._top()
        above: list[_Entry] = []
        node = top
        while node is not None and node[_OWNER] is not owner and node[_OWNER] is not _ROOT_OWNER:
            above.append(node)
            node = node[_PARENT]
        if node is None or node[_OWNER] is not owner:
            return None
        self._var.set(node[_PARENT])
        above.reverse()
        wall = end_ns - node[_START]
        cpu = cpu_end - node[_CPU] if node[_CPU] >= 0 and cpu_end >= 0 else -1
        return node[_START], wall, min(cpu, wall), above or None, node[_TRACE]

    def record(
        self,
        key: int,
        exc_type: type[BaseException] | None,
        flags: int,
        start_ns: int,
        wall_ns: int,
        cpu_ns: int,
        trace: tuple[int, ...] | None = None,
        /,
    ) -> None:
        _check_field(key, _U32, "key")
        _check_field(flags, _U16, "flags")
        if not self.enabled:
            return
        if cpu_ns > wall_ns:  # as in _close()
            cpu_ns = wall_ns
        try:
            error = self._error_id(exc_type)
            if trace is None:
                self._ring._push((key, error, flags, start_ns, wall_ns, cpu_ns))
            else:
                self._push(key, error, flags, start_ns, wall_ns, cpu_ns, None, trace)
        except Exception:
            self._internal_errors.add()

    def _error_id(self, exc_type: type[BaseException] | None) -> int:
        if exc_type is None:
            return NO_ERROR
        try:
            return int(self._registry.error_id(exc_type))
        except Exception:
            # As in C: the call is still recorded, as an error of type _OTHER.
            self._internal_errors.add()
            return OTHER_ERROR

    def current_key(self) -> int:
        top = self._top()
        return top[_KEY] if top is not None else NO_MODEL_KEY

    def use_frame(self, root_key: int, trace: tuple[int, ...] | None = None, /) -> None:
        _check_field(root_key, _U32, "key")
        self._var.set([_ROOT_OWNER, int(root_key), None, 0, self._generation, 0, -1, 0, None, trace])

    def active_depth(self) -> int:
        top = self._top()
        return top[_DEPTH] + top[_OVERFLOW] if top is not None else 0

    def after_fork_in_child(self) -> None:
        self._generation += 1
        self._depth_dropped.reset()
        self._internal_errors.reset()
        self._ring.reset()
