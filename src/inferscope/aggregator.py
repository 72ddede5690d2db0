"""Aggregation of ring records into per-series histograms: :class:`Aggregator`, :class:`Series`.

The drainer hands :class:`Aggregator` numpy arrays of ``RECORD_DTYPE``; :meth:`Aggregator.add` folds a
whole batch into per-series histograms (:class:`~inferscope.histogram.Histogram`), never with a Python
loop per record: in one C pass with the GIL released on the C backend (``fold_records``, see
``_native/fold.h``), with a handful of vectorised numpy passes on the pure-Python backend. Both folds
give the same bits; the merge into the series is shared. A series is one (key, error id) pair.

Everything that reads numbers (exporters, ``snapshot()``, the CLI) goes through
:meth:`Aggregator.view`, which deep-copies under the aggregator's lock into an :class:`AggregateView`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._backend import BACKEND
from ._keys import KeyInfo, KeyRegistry
from ._records import COUNTER_SLOTS, FLAG_ABANDONED, NO_ERROR, RECORD_DTYPE
from .histogram import SCALE, Histogram, _bucket_indices, _Scratch, _sub_bucket_tables, bucket_indices

__all__ = ["AggregateView", "Aggregator", "Series"]

# A series id packs (key, error id) into one int: key is u32 and error u16 in the record.
_ERROR_BITS = 16
_ERROR_MASK = (1 << _ERROR_BITS) - 1
# Above this many (key, error) combinations a lookup table would cost more than it saves; fall back
# to np.unique (a sort) for such unusual batches.
_MAX_LOOKUP_TABLE = 1 << 20


@dataclass(eq=False)
class Series:
    """Everything aggregated for one (key, error id) pair."""

    info: KeyInfo
    error_id: int  # 0 = success
    error_type: str | None  # registry.error_name(error_id)
    duration: Histogram  # wall_ns / 1e9
    cpu: Histogram | None  # cpu_ns / 1e9 where measured; None until a record with cpu_ns >= 0 arrives
    abandoned: int  # records with flags & FLAG_ABANDONED
    counters: np.ndarray  # int64 sums of the `counters` field, shape (COUNTER_SLOTS,)
    #: Wall seconds of the records whose CPU was measured: the denominator of a cpu/wall ratio that
    #: stays honest when the counter set changes while the series lives.
    cpu_wall_seconds: float = 0.0
    #: Device time of a stage marked ``device="cuda"``, from CUDA events (counters/cuda.py); None
    #: until one was measured.
    gpu: Histogram | None = None

    @classmethod
    def new(cls, info: KeyInfo, error_id: int, error_type: str | None) -> Series:
        """An empty series."""
        return cls(info, error_id, error_type, Histogram.empty(), None, 0, np.zeros(COUNTER_SLOTS, np.int64))

    def copy(self) -> Series:
        """A deep copy (``info`` is immutable and shared)."""
        return Series(
            self.info,
            self.error_id,
            self.error_type,
            self.duration.copy(),
            None if self.cpu is None else self.cpu.copy(),
            self.abandoned,
            self.counters.copy(),
            self.cpu_wall_seconds,
            None if self.gpu is None else self.gpu.copy(),
        )


@dataclass(frozen=True)
class AggregateView:
    """A consistent, copied view of everything aggregated so far.

    Exporters, ``snapshot()`` and the CLI read this, never the live aggregator.
    """

    series: tuple[Series, ...]  # ordered by (key, error id)
    dropped: Mapping[str, int]  # cumulative drops by reason
    keys_overflowed: int
    internal_errors: int
    start_time_unix_nano: int
    spans_dropped: Mapping[str, int] = field(default_factory=dict)  # cumulative, by reason; tracing only


class _BatchHistograms(NamedTuple):
    """One batch's values folded per row (row = index into the batch's distinct series)."""

    value_count: np.ndarray
    value_sum: np.ndarray
    zero_count: np.ndarray
    min_positive: np.ndarray
    max_positive: np.ndarray
    low_index: np.ndarray  # bucket index of each row's first slot in `buckets`
    start: np.ndarray  # where each row's slots begin in `buckets`
    span: np.ndarray  # how many slots each row has
    buckets: np.ndarray

    def merge_row_into(self, row: int, hist: Histogram) -> None:
        count = int(self.value_count[row])
        if count == 0:
            return
        zeros = int(self.zero_count[row])
        start, span = int(self.start[row]), int(self.span[row])
        hist._add_counts(int(self.low_index[row]), self.buckets[start : start + span])
        hist.zero_count += zeros
        hist.count += count
        hist.sum += float(self.value_sum[row])
        if zeros:
            hist.min = min(hist.min, 0.0)
            hist.max = max(hist.max, 0.0)
        if span:
            hist.min = min(hist.min, float(self.min_positive[row]))
            hist.max = max(hist.max, float(self.max_positive[row]))


def _fold(rows: np.ndarray, seconds: np.ndarray, row_count: int, scratch: _Scratch) -> _BatchHistograms:
    """Per-row histograms of ``seconds`` (>= 0) in one bincount over row-major bucket slots."""
    count = np.bincount(rows, minlength=row_count)
    total = np.bincount(rows, weights=seconds, minlength=row_count)
    positive = seconds > 0
    if positive.all():
        zero_count = np.zeros(row_count, dtype=np.int64)
        positive_count = count
    else:
        zero_count = np.bincount(rows[~positive], minlength=row_count)
        rows, seconds = rows[positive], seconds[positive]
        positive_count = count - zero_count
    min_positive = np.full(row_count, np.inf)
    max_positive = np.zeros(row_count)
    np.minimum.at(min_positive, rows, seconds)
    np.maximum.at(max_positive, rows, seconds)
    # The index is exact integer arithmetic, hence monotone, so each row's bucket range is the range
    # of its extremes; packing rows by their own ranges keeps the bincount small however far apart
    # the rows' values are.
    occupied = positive_count > 0
    low_index = np.zeros(row_count, dtype=np.int64)
    span = np.zeros(row_count, dtype=np.int64)
    if occupied.any():
        low_index[occupied] = bucket_indices(min_positive[occupied])
        span[occupied] = bucket_indices(max_positive[occupied]) - low_index[occupied] + 1
    indices = _bucket_indices(seconds, SCALE, scratch)
    start = np.concatenate(([0], np.cumsum(span)[:-1])).astype(np.int64)
    slots = indices  # scratch, ours to overwrite
    slots += np.take(start - low_index, rows, out=scratch.get("slot_base", rows.size, np.int64), mode="clip")
    buckets = np.bincount(slots, minlength=int(span.sum())).astype(np.int64, copy=False)
    return _BatchHistograms(
        count, total, zero_count, min_positive, max_positive, low_index, start, span, buckets
    )


def _series_rows(keys: np.ndarray, errors: np.ndarray, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(row of each record, series id of each row): rows number the batch's distinct series densely.

    The rows array lives in ``scratch`` (name "rows").
    """
    size = keys.size
    # Index arithmetic in the platform's index type: numpy converts u16/u32 indices on every use.
    key_index = scratch.get("key_index", size, np.intp)
    np.copyto(key_index, keys)
    error_index = scratch.get("error_index", size, np.intp)
    np.copyto(error_index, errors)
    if error_index.any():
        # Errors are rare and few: renumber the error ids present so that the table stays small.
        error_ids = np.unique(np.append(error_index[error_index != 0], 0))
        error_rank = np.zeros(int(error_ids[-1]) + 1, dtype=np.intp)
        error_rank[error_ids] = np.arange(error_ids.size)
        combined = np.multiply(key_index, error_ids.size, out=scratch.get("combined", size, np.intp))
        combined += np.take(error_rank, error_index, out=scratch.get("rows", size, np.intp), mode="clip")
    else:
        error_ids = np.zeros(1, dtype=np.intp)
        combined = key_index
    table_size = (int(key_index.max()) + 1) * error_ids.size
    if table_size <= max(_MAX_LOOKUP_TABLE, 4 * size):
        # A lookup table over the small (key, error) space is much cheaper than np.unique's sort.
        present = np.flatnonzero(np.bincount(combined, minlength=table_size))
        table = np.empty(table_size, dtype=np.intp)
        table[present] = np.arange(present.size)
        rows = np.take(table, combined, out=scratch.get("rows", size, np.intp), mode="clip")
        series_ids = ((present // error_ids.size) << _ERROR_BITS) | error_ids[present % error_ids.size]
    else:
        ids = (key_index.astype(np.int64) << _ERROR_BITS) | error_index
        series_ids, inverse = np.unique(ids, return_inverse=True)
        rows = scratch.get("rows", size, np.intp)
        rows[:] = inverse
    return rows, series_ids.astype(np.int64)


class _BatchFold(NamedTuple):
    """Everything one batch adds to the series, per row (row = index into ``series_ids``)."""

    series_ids: np.ndarray  # (key << _ERROR_BITS) | error id, ascending
    duration: _BatchHistograms  # of the wall seconds
    cpu: _BatchHistograms | None  # of the CPU seconds where measured; None when no record measured them
    cpu_wall: np.ndarray | None  # wall seconds of the records whose CPU was measured; None with cpu
    abandoned: np.ndarray | None  # None when no record was abandoned
    counter_sums: np.ndarray | None  # int64, (rows, COUNTER_SLOTS); None when every counter is 0


def _fold_batch(records: np.ndarray, scratch: _Scratch) -> _BatchFold:
    """The numpy fold of a batch: a handful of vectorised passes, holding the GIL (numpy releases
    it only inside its larger operations). The pure-Python backend's path."""
    size = records.size
    rows, series_ids = _series_rows(records["key"], records["error"], scratch)
    row_count = series_ids.size

    wall_seconds = np.divide(records["wall_ns"], 1e9, out=scratch.get("wall", size, np.float64))
    np.maximum(wall_seconds, 0.0, out=wall_seconds)  # a clock step must not make a negative duration
    duration = _fold(rows, wall_seconds, row_count, scratch)

    cpu_ns = records["cpu_ns"]
    measured = cpu_ns >= 0
    cpu: _BatchHistograms | None = None
    cpu_wall: np.ndarray | None = None
    if measured.all():
        cpu_seconds = np.divide(cpu_ns, 1e9, out=scratch.get("cpu", size, np.float64))
        cpu = _fold(rows, cpu_seconds, row_count, scratch)
        cpu_wall = duration.value_sum
    elif measured.any():
        cpu_rows = rows[measured]
        cpu = _fold(cpu_rows, cpu_ns[measured] / 1e9, row_count, scratch)
        cpu_wall = np.bincount(cpu_rows, weights=wall_seconds[measured], minlength=row_count)

    abandoned_mask = (records["flags"] & FLAG_ABANDONED) != 0
    abandoned = np.bincount(rows[abandoned_mask], minlength=row_count) if abandoned_mask.any() else None

    counters = records["counters"]
    counter_sums: np.ndarray | None = None
    if counters.any():
        # ufunc.at on int64 keeps large counter sums exact (bincount's float weights would not).
        counter_sums = np.zeros((row_count, COUNTER_SLOTS), dtype=np.int64)
        for slot in range(COUNTER_SLOTS):
            np.add.at(counter_sums[:, slot], rows, counters[:, slot])
    return _BatchFold(series_ids, duration, cpu, cpu_wall, abandoned, counter_sums)


#: The dtypes of _BatchHistograms' fields, in order, as fold_records returns them.
_HISTOGRAM_FIELD_DTYPES = (
    np.int64,
    np.float64,
    np.int64,
    np.float64,
    np.float64,
    np.int64,
    np.int64,
    np.int64,
    np.int64,
)


def _fold_batch_native(records: np.ndarray) -> _BatchFold:
    """The same fold as :func:`_fold_batch`, bit for bit, by the C extension's ``fold_records``
    with the GIL released: serving threads run Python code while the drainer folds."""
    from ._native import fold_records

    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"records must be an array of RECORD_DTYPE, got dtype {records.dtype}")
    if not records.flags.c_contiguous or records.ctypes.data % 8:
        # The C fold reads the records in place: a strided or misaligned view is copied first (numpy
        # calls any address aligned for RECORD_DTYPE, whose alignment is 1, but the int64 fields want 8).
        records = records.copy()
    below, next_start = _sub_bucket_tables(SCALE)
    return batch_fold_of_native(fold_records(records, SCALE, below, next_start))


def batch_fold_of_native(fold: tuple) -> _BatchFold:  # type: ignore[type-arg]
    """A fold as the C extension hands it over (``fold_records``, ``Collector.collect``): bytes
    per field, read in place."""
    series_ids, duration, cpu, cpu_wall, abandoned, counter_sums = fold

    def histograms(fields: tuple[bytes, ...]) -> _BatchHistograms:
        return _BatchHistograms(
            *(np.frombuffer(b, dtype) for b, dtype in zip(fields, _HISTOGRAM_FIELD_DTYPES, strict=True))
        )

    return _BatchFold(
        np.frombuffer(series_ids, np.int64),
        histograms(duration),
        None if cpu is None else histograms(cpu),
        None if cpu_wall is None else np.frombuffer(cpu_wall, np.float64),
        None if abandoned is None else np.frombuffer(abandoned, np.int64),
        None if counter_sums is None else np.frombuffer(counter_sums, np.int64).reshape(-1, COUNTER_SLOTS),
    )


class Aggregator:
    """The one source of truth for numbers: per-series histograms and counts of everything drained.

    ``add()`` runs on the drainer thread; ``view()`` on exporter and user threads. One lock guards the
    series; ``add()`` folds the batch before taking it, in C with the GIL released when the C backend
    is in use (or ``native_fold=True``), else with numpy.

    >>> from inferscope._keys import KeyRegistry
    >>> from inferscope._records import empty_records
    >>> registry = KeyRegistry()
    >>> batch = empty_records(2)
    >>> batch["key"] = registry.inference_key("fraud")
    >>> batch["wall_ns"] = [5_000_000, 7_000_000]
    >>> aggregator = Aggregator(registry)
    >>> aggregator.add(batch)
    >>> aggregator.view().series[0].duration.count
    2
    """

    def __init__(
        self,
        registry: KeyRegistry,
        *,
        start_time_unix_nano: int | None = None,
        native_fold: bool | None = None,
    ) -> None:
        self.registry = registry
        # Fold batches in C, off the GIL (_fold_batch_native); by default when the C backend is in use.
        self._native_fold = BACKEND == "c" if native_fold is None else native_fold
        self._lock = threading.Lock()  # guards the series and counts below
        # Serialises add() calls (the drainer and a final drain at shutdown may overlap) because they
        # share the scratch arrays; view() never takes it.
        self._add_lock = threading.Lock()
        self._scratch = _Scratch()
        self._series: dict[int, Series] = {}
        self._dropped: dict[str, int] = {}
        self._spans_dropped: dict[str, int] = {}
        self._internal_errors = 0
        self._start_time_unix_nano = time.time_ns() if start_time_unix_nano is None else start_time_unix_nano

    def add(self, records: np.ndarray) -> None:
        """Fold a batch of ``RECORD_DTYPE`` records into the series."""
        if records.size == 0:
            return
        with self._add_lock:
            self._add(records)

    def _fresh_series(self, series_ids: np.ndarray) -> dict[int, Series]:
        """New series for the ids not seen yet. Names are resolved before any series is touched, so
        an unknown key or error id (IndexError) leaves the aggregates as they were."""
        with self._lock:
            missing = [int(sid) for sid in series_ids.tolist() if sid not in self._series]
        return {
            sid: Series.new(
                self.registry.info(sid >> _ERROR_BITS),
                sid & _ERROR_MASK,
                None if sid & _ERROR_MASK == NO_ERROR else self.registry.error_name(sid & _ERROR_MASK),
            )
            for sid in missing
        }

    def add_gpu_times(self, keys: np.ndarray, seconds: np.ndarray) -> None:
        """Fold device times (one per completed stage marked ``device="cuda"``) into the
        successful series of their keys."""
        if keys.size == 0:
            return
        with self._add_lock:
            scratch = self._scratch
            rows, series_ids = _series_rows(keys, np.zeros(keys.size, np.uint16), scratch)
            fresh = self._fresh_series(series_ids)
            gpu = _fold(rows, np.maximum(seconds, 0.0), series_ids.size, scratch)
            with self._lock:
                for sid, series in fresh.items():
                    self._series.setdefault(sid, series)
                for row, sid in enumerate(series_ids.tolist()):
                    series = self._series[sid]
                    if series.gpu is None:
                        series.gpu = Histogram.empty()
                    gpu.merge_row_into(row, series.gpu)

    def add_fold(self, batch: _BatchFold) -> None:
        """Merge a batch folded already (by the native drainer, ``batch_fold_of_native``)."""
        with self._add_lock:
            self._merge(batch)

    def _add(self, records: np.ndarray) -> None:
        self._merge(_fold_batch_native(records) if self._native_fold else _fold_batch(records, self._scratch))

    def _merge(self, batch: _BatchFold) -> None:
        fresh = self._fresh_series(batch.series_ids)
        duration, cpu, cpu_wall = batch.duration, batch.cpu, batch.cpu_wall
        with self._lock:
            for sid, series in fresh.items():
                self._series.setdefault(sid, series)
            for row, sid in enumerate(batch.series_ids.tolist()):
                series = self._series[sid]
                duration.merge_row_into(row, series.duration)
                if cpu is not None and cpu_wall is not None and cpu.value_count[row]:
                    if series.cpu is None:
                        series.cpu = Histogram.empty()
                    cpu.merge_row_into(row, series.cpu)
                    series.cpu_wall_seconds += float(cpu_wall[row])
                if batch.abandoned is not None:
                    series.abandoned += int(batch.abandoned[row])
                if batch.counter_sums is not None:
                    series.counters += batch.counter_sums[row]

    def set_dropped(self, reason: str, total: int) -> None:
        """Record the cumulative number of records dropped for ``reason`` (read from the ring/runtime)."""
        with self._lock:
            self._dropped[reason] = int(total)

    def set_spans_dropped(self, totals: Mapping[str, int]) -> None:
        """Record the cumulative number of spans the tracer did not export, by reason."""
        with self._lock:
            self._spans_dropped = {reason: int(n) for reason, n in totals.items()}

    def set_internal_errors(self, total: int) -> None:
        """Record the cumulative number of inferscope's own failures."""
        with self._lock:
            self._internal_errors = int(total)

    def view(self) -> AggregateView:
        """A deep copy of everything aggregated so far, consistent across series."""
        with self._lock:
            series = tuple(self._series[sid].copy() for sid in sorted(self._series))
            dropped = dict(self._dropped)
            spans_dropped = dict(self._spans_dropped)
            internal_errors = self._internal_errors
            start = self._start_time_unix_nano
        return AggregateView(series, dropped, self.registry.overflowed, internal_errors, start, spans_dropped)

    def duration_quantiles(self, q: float, min_count: int) -> dict[int, float]:
        """Per key, the ``q`` quantile in seconds of the successful calls' durations so far, for keys
        with at least ``min_count`` of them, rounded up to the upper boundary of its bucket: a call
        slower than this is slower than the quantile, whatever the bucket's resolution. The tail
        sampler keeps those calls."""
        with self._lock:
            histograms = [
                (series.info.key, series.duration.copy())
                for series in self._series.values()
                if series.error_id == 0 and series.duration.count >= min_count
            ]
        # quantile() estimates by the bucket's geometric midpoint: half a bucket up is its boundary.
        return {key: h.quantile(q) * 2 ** (2.0**-h.scale / 2) for key, h in histograms}

    def reset(self, start_time_unix_nano: int | None = None) -> None:
        """Forget all series, drop counts and internal-error counts (in a child after ``fork()``).

        The child's ring and runtime count drops and errors from zero again, and the parent exports
        what it aggregated, so nothing here may carry over. Keys live in the registry and survive.
        """
        with self._lock:
            self._series.clear()
            self._dropped.clear()
            self._spans_dropped = {}
            self._internal_errors = 0
            self._start_time_unix_nano = (
                time.time_ns() if start_time_unix_nano is None else start_time_unix_nano
            )

    def after_fork_in_child(self) -> None:
        """Start over in a forked child. Only the forking thread survives fork(): the drainer may
        have held either lock at that moment, so both are replaced before anything takes them."""
        self._lock = threading.Lock()
        self._add_lock = threading.Lock()
        self.reset()
