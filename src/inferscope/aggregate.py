"""Aggregation of ring records into per-series exponential histograms, and the ``snapshot()`` types.

The drainer hands :class:`Aggregator` numpy arrays of ``RECORD_DTYPE``; :meth:`Aggregator.add` folds a
whole batch into per-series histograms with a handful of vectorised numpy passes, never a Python loop
per record. A series is one (key, error id) pair. Durations and thread CPU times land in base-2
exponential histograms with the OpenTelemetry ``ExponentialHistogram`` bucket layout at a fixed scale
(:data:`SCALE`), so exporters can hand the buckets to OTel unchanged (downscaling only when a
histogram has more buckets than the configured maximum).

Everything that reads numbers (exporters, ``snapshot()``, the CLI) goes through
:meth:`Aggregator.view`, which deep-copies under the aggregator's lock.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ._keys import KeyInfo, KeyRegistry
from ._records import COUNTER_SLOTS, FLAG_ABANDONED, NO_ERROR
from .counters import CounterMetric, counter_label, counter_value, counters_of

__all__ = [
    "MIN_SCALE",
    "SCALE",
    "AggregateView",
    "Aggregator",
    "Histogram",
    "Series",
    "Snapshot",
    "StatsRow",
    "bucket_indices",
    "build_snapshot",
]

#: The fixed scale of every histogram the aggregator builds: bucket ``i`` holds
#: ``(2**(i/64), 2**((i+1)/64)]`` seconds, so the relative error of any quantile estimate is at most
#: ``2**(1/128) - 1`` (about 0.54%).
SCALE = 6

#: The lowest scale OTel allows; at scale -10 two buckets cover every positive float64.
MIN_SCALE = -10

# A series id packs (key, error id) into one int: key is u32 and error u16 in the record.
_ERROR_BITS = 16
_ERROR_MASK = (1 << _ERROR_BITS) - 1
# Above this many (key, error) combinations a lookup table would cost more than it saves; fall back
# to np.unique (a sort) for such unusual batches.
_MAX_LOOKUP_TABLE = 1 << 20


# Within an octave, values are sorted by their 52 fraction bits; the top _CELL_BITS of them pick a
# cell narrower than any bucket at scale <= _MAX_TABLE_SCALE, so a cell holds at most one boundary.
_FRACTION_BITS = 52
_CELL_BITS = 12
_MAX_TABLE_SCALE = 10


@functools.cache
def _sub_bucket_tables(scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: buckets of the octave that lie wholly below the cell, and the next bucket's start.

    A bucket's start is the smallest float64 above ``2**(k / 2**scale)``, found with exact integer
    arithmetic, so indices are exact even for the floats nearest to (irrational) bucket boundaries.
    """
    per_octave = 1 << scale
    one = 1 << _FRACTION_BITS

    def above_boundary(value: float, k: int) -> bool:
        # value**per_octave > 2**k, with value = mantissa / 2**52 exactly.
        mantissa = int(value * one)
        return bool(mantissa**per_octave > 1 << (k + _FRACTION_BITS * per_octave))

    starts = []
    for k in range(per_octave):
        value = 2.0 ** (k / per_octave)
        while value > 1.0 and above_boundary(math.nextafter(value, 0.0), k):
            value = math.nextafter(value, 0.0)
        while not above_boundary(value, k):
            value = math.nextafter(value, 2.0)
        starts.append(int(value * one) - one)
    fraction_starts = np.array(starts, dtype=np.int64)
    cell_lows = np.arange(1 << _CELL_BITS, dtype=np.int64) << (_FRACTION_BITS - _CELL_BITS)
    below = np.searchsorted(fraction_starts, cell_lows, side="right")
    # A cell with no boundary inside gets an unreachable "next start", so its comparison is false.
    next_start = np.append(fraction_starts, one)[below]
    return below.astype(np.int64), next_start


class _Scratch:
    """Batch-sized work arrays that ``Aggregator.add`` reuses from one call to the next.

    A fresh batch-sized temporary is a new mmap, and on VMs like ours its page faults cost several
    times the arithmetic done in it: reusing about ten arrays of the largest batch seen (5 MiB for
    65k records) roughly doubles add() throughput. One user at a time; arrays handed out under one
    name are overwritten by the next request for that name.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type[np.generic]) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = np.empty(size, dtype=dtype)
            self._arrays[name] = array
        return array[:size]


def bucket_indices(seconds: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """OTel exponential-histogram bucket index of every value in ``seconds`` (all finite and > 0).

    Bucket ``i`` holds ``(base**i, base**(i+1)]`` with ``base = 2**(2**-scale)``; a value that is
    exactly a bucket's upper bound belongs to that bucket, e.g. ``1.0`` is in bucket ``-1``:

    >>> bucket_indices(np.array([1.0, 1.001, 2.0]), scale=6).tolist()
    [-1, 0, 63]
    """
    return _bucket_indices(np.asarray(seconds, dtype=np.float64), scale, _Scratch())


def _bucket_indices(values: np.ndarray, scale: int, scratch: _Scratch) -> np.ndarray:
    """``bucket_indices`` computed in ``scratch``; the result is the scratch array "exponent"."""
    size = values.size
    values = np.ascontiguousarray(values, dtype=np.float64)
    bits = values.view(np.int64)
    exponent: np.ndarray = np.right_shift(bits, _FRACTION_BITS, out=scratch.get("exponent", size, np.int64))
    if size and exponent.min() == 0:
        # Subnormals have no implicit leading 1; scaling them by 2**64 (exact) makes them normal.
        subnormal = exponent == 0
        values = np.where(subnormal, values * 2.0**64, values)
        bits = values.view(np.int64)
        np.right_shift(bits, _FRACTION_BITS, out=exponent)
        exponent -= np.where(subnormal, 64, 0)
    exponent -= 1023
    fraction = np.bitwise_and(bits, (1 << _FRACTION_BITS) - 1, out=scratch.get("fraction", size, np.int64))
    if scale <= 0:
        # The index at scale 0 is the exponent, one less for an exact power of two; coarser scales
        # merge 2**-scale neighbours, which is an arithmetic shift as in OTel's own downscale.
        exponent -= fraction == 0
        exponent >>= -scale
        return exponent
    exponent <<= scale
    exponent -= 1
    if scale <= _MAX_TABLE_SCALE:
        # Integer-only: two table lookups per value, exact and several times faster than np.log2.
        # mode="clip" (cells are always in range) because take() buffers `out` in the default mode.
        below, next_start = _sub_bucket_tables(scale)
        cell = np.right_shift(fraction, _FRACTION_BITS - _CELL_BITS, out=scratch.get("cell", size, np.intp))
        looked_up = scratch.get("looked_up", size, np.int64)
        exponent += np.take(below, cell, out=looked_up, mode="clip")
        exponent += fraction >= np.take(next_start, cell, out=looked_up, mode="clip")
    else:
        # Finer than any table: log2 of the mantissa in [1, 2) can be off by one right next to a
        # (irrational) boundary, which the OTel specification tolerates; powers of two stay exact.
        fraction |= 1023 << _FRACTION_BITS
        exponent += np.ceil(np.log2(fraction.view(np.float64)) * float(1 << scale)).astype(np.int64)
    return exponent


def _bucket_index(value: float, scale: int) -> int:
    return int(bucket_indices(np.array([value], dtype=np.float64), scale)[0])


def _bucket_lower_bound(index: float | np.ndarray, scale: int) -> Any:
    return np.exp2(np.asarray(index, dtype=np.float64) * 2.0**-scale)


@dataclass(eq=False)
class Histogram:
    """Base-2 exponential histogram of values in seconds, OTel layout.

    Bucket ``offset + k`` holds ``counts[k]`` values in ``(base**i, base**(i+1)]`` with
    ``base = 2**(2**-scale)``; zeros are counted apart in ``zero_count``. ``counts`` may hold zero
    entries at either end. Two histograms compare equal when they hold the same distribution, even if
    their arrays are padded differently.

    >>> h = Histogram.empty()
    >>> h.merge(Histogram.of([0.010, 0.020, 0.030]))
    >>> h.count, round(h.quantile(0.5), 3)
    (3, 0.02)
    """

    scale: int
    zero_count: int  # values == 0 (negative inputs are clamped to 0)
    offset: int  # OTel bucket index of counts[0]
    counts: np.ndarray  # int64
    count: int  # total, including zero_count
    sum: float
    min: float  # math.inf when empty
    max: float  # -math.inf when empty

    @classmethod
    def empty(cls, scale: int = SCALE) -> Histogram:
        """A histogram with no values."""
        return cls(scale, 0, 0, np.zeros(0, dtype=np.int64), 0, 0.0, math.inf, -math.inf)

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray, scale: int = SCALE) -> Histogram:
        """A histogram of the given values (negative ones count as 0), e.g. ``Histogram.of([0.1, 0.2])``."""
        values = np.maximum(np.asarray(seconds, dtype=np.float64).ravel(), 0.0)
        hist = cls.empty(scale)
        if values.size == 0:
            return hist
        positive = values[values > 0]
        hist.zero_count = int(values.size - positive.size)
        hist.count = int(values.size)
        hist.sum = float(values.sum())
        hist.min = float(values.min())
        hist.max = float(values.max())
        if positive.size:
            idx = bucket_indices(positive, scale)
            hist.offset = int(idx.min())
            hist.counts = np.bincount(idx - hist.offset).astype(np.int64)
        return hist

    def copy(self) -> Histogram:
        """A deep copy."""
        return Histogram(
            self.scale,
            self.zero_count,
            self.offset,
            self.counts.copy(),
            self.count,
            self.sum,
            self.min,
            self.max,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        a_offset, a_counts = self._trimmed()
        b_offset, b_counts = other._trimmed()
        return (
            self.scale == other.scale
            and self.zero_count == other.zero_count
            and self.count == other.count
            and self.sum == other.sum
            and self.min == other.min
            and self.max == other.max
            and (a_counts.size == 0 or a_offset == b_offset)
            and np.array_equal(a_counts, b_counts)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _trimmed(self) -> tuple[int, np.ndarray]:
        """(offset, counts) without zero entries at either end."""
        nonzero = np.flatnonzero(self.counts)
        if nonzero.size == 0:
            return 0, self.counts[:0]
        return self.offset + int(nonzero[0]), self.counts[nonzero[0] : nonzero[-1] + 1]

    def _add_counts(self, offset: int, counts: np.ndarray) -> None:
        """Add ``counts`` (bucket ``offset`` first) to the buckets, growing the array as needed."""
        if counts.size == 0:
            return
        if self.counts.size == 0:
            self.offset = offset
            self.counts = counts.astype(np.int64, copy=True)
            return
        lo = min(self.offset, offset)
        hi = max(self.offset + self.counts.size, offset + counts.size)
        if lo != self.offset or hi != self.offset + self.counts.size:
            # New extremes are rare once a series has warmed up, so growing exactly is cheap enough.
            grown = np.zeros(hi - lo, dtype=np.int64)
            grown[self.offset - lo : self.offset - lo + self.counts.size] = self.counts
            self.offset, self.counts = lo, grown
        self.counts[offset - self.offset : offset - self.offset + counts.size] += counts

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s values to this histogram, in place.

        When the scales differ, the finer histogram is downscaled to the coarser scale first (this one
        in place, if it is the finer), as the OTel SDK does; the aggregator's own histograms all share
        :data:`SCALE`, so that only happens for histograms built elsewhere.
        """
        if other.count == 0:
            return
        if other.scale > self.scale:
            other = other._downscale_by(other.scale - self.scale)
        elif other.scale < self.scale:
            shrunk = self._downscale_by(self.scale - other.scale)
            self.scale, self.offset, self.counts = shrunk.scale, shrunk.offset, shrunk.counts
        self._add_counts(other.offset, other.counts)
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value_at(self, rank: int, cumulative: np.ndarray) -> float:
        """Estimate of the value with 0-based ``rank`` in sorted order."""
        if rank < self.zero_count:
            return 0.0
        position = int(np.searchsorted(cumulative, rank - self.zero_count, side="right"))
        midpoint = float(_bucket_lower_bound(self.offset + position + 0.5, self.scale))
        return min(max(midpoint, self.min), self.max)

    def quantile(self, q: float) -> float:
        """Estimate of the ``q`` quantile (``q`` in [0, 1]) in seconds; ``nan`` when empty.

        Ranks follow ``numpy.percentile``'s default (linear between the two neighbouring order
        statistics); each order statistic is estimated by the geometric midpoint of its bucket, clamped
        to [min, max], so the relative error is at most ``2**(2**-scale / 2) - 1``.

        >>> round(Histogram.of([1.0, 2.0, 3.0, 4.0]).quantile(0.5), 2)
        2.5
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return math.nan
        if q == 0.0:
            return self.min
        if q == 1.0:
            return self.max
        rank = q * (self.count - 1)
        below = math.floor(rank)
        fraction = rank - below
        cumulative = np.cumsum(self.counts)
        low = self._value_at(below, cumulative)
        if fraction == 0.0 or below + 1 >= self.count:
            return low
        high = self._value_at(below + 1, cumulative)
        return low + (high - low) * fraction

    def _downscale_by(self, shift: int) -> Histogram:
        """A copy at ``scale - shift``: bucket ``i`` merges into ``i >> shift``, OTel's rule."""
        if shift < 0:
            raise ValueError(f"cannot downscale by a negative amount ({shift})")
        offset, counts = self._trimmed()
        result = self.copy()
        result.scale = self.scale - shift
        if counts.size == 0:
            result.offset, result.counts = 0, counts.copy()
            return result
        merged = (offset + np.arange(counts.size, dtype=np.int64)) >> shift
        starts = np.concatenate(([0], np.flatnonzero(np.diff(merged)) + 1))
        result.offset = int(merged[0])
        result.counts = np.zeros(int(merged[-1]) - result.offset + 1, dtype=np.int64)
        result.counts[merged[starts] - result.offset] = np.add.reduceat(counts, starts)
        return result

    def downscaled(self, max_buckets: int) -> Histogram:
        """A copy at the highest scale whose non-empty bucket range fits in ``max_buckets``.

        Reduces the scale by the smallest ``n`` that fits, merging bucket ``i`` into ``i >> n`` as OTel
        does; ``self`` is unchanged. Raises ``ValueError`` if even :data:`MIN_SCALE` does not fit (only
        possible for ``max_buckets == 1`` with values on both sides of 1 s).

        >>> Histogram.of([0.001, 1.5, 900.0]).downscaled(4).scale  # 2**-10 .. 2**10 s in 8-octave buckets
        -3
        """
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, got {max_buckets}")
        offset, counts = self._trimmed()
        if counts.size == 0:
            return self._downscale_by(0)
        lo, hi = offset, offset + counts.size - 1
        shift = 0
        while (hi >> shift) - (lo >> shift) + 1 > max_buckets:
            shift += 1
            if self.scale - shift < MIN_SCALE:
                raise ValueError(
                    f"{counts.size} buckets at scale {self.scale} do not fit in {max_buckets} "
                    f"at any scale >= {MIN_SCALE}"
                )
        return self._downscale_by(shift)

    def _count_at_most(self, bound: float, cumulative: np.ndarray) -> float:
        """Estimated (fractional) number of values <= ``bound``."""
        if self.count == 0 or bound < 0 or bound < self.min:
            return 0.0
        if bound >= self.max:
            return float(self.count)
        if bound == 0:
            return float(self.zero_count)
        index = _bucket_index(bound, self.scale)
        position = index - self.offset
        if position < 0:
            return float(self.zero_count)
        if position >= self.counts.size:
            return float(self.count)
        below = float(cumulative[position - 1]) if position > 0 else 0.0
        inside = float(self.counts[position])
        if inside == 0:
            return self.zero_count + below
        # Work in log2 units of buckets, where the bucket is [index, index + 1]; the observed min and
        # max narrow it when they fall inside, which sharpens the split for the outermost buckets.
        per_octave = 2.0**self.scale
        low_end = float(index)
        if self.min > 0:
            low_end = max(low_end, math.log2(self.min) * per_octave)
        high_end = min(index + 1.0, math.log2(self.max) * per_octave)
        where = math.log2(bound) * per_octave
        if high_end <= low_end:
            fraction = 1.0 if where >= high_end else 0.0
        else:
            fraction = min(max((where - low_end) / (high_end - low_end), 0.0), 1.0)
        return self.zero_count + below + inside * fraction

    def explicit_bucket_counts(self, boundaries: Sequence[float]) -> list[int]:
        """Non-cumulative counts in OTel's explicit-bucket layout for ``boundaries`` (increasing).

        Bucket ``k`` holds ``(b[k-1], b[k]]``; the first is ``(-inf, b[0]]`` and the last
        ``(b[-1], +inf)``, so the result has ``len(boundaries) + 1`` entries summing to ``count``.
        ``zero_count`` goes to the first bucket whose upper bound is >= 0. An exponential bucket that
        straddles a boundary is split in proportion to where the boundary falls in log space (within
        the observed [min, max]); the cumulative counts are rounded, so the total stays exact.

        >>> Histogram.of([0.001, 0.002, 0.5]).explicit_bucket_counts([0.01, 0.1])
        [2, 0, 1]
        """
        bounds = [float(b) for b in boundaries]
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"explicit bucket boundaries must be strictly increasing, got {bounds}")
        cumulative = np.cumsum(self.counts)
        at_most = np.array([self._count_at_most(b, cumulative) for b in bounds] + [float(self.count)])
        # Rounding the cumulative counts (not each bucket) keeps them monotone and the total exact.
        rounded = np.clip(np.rint(at_most).astype(np.int64), 0, self.count)
        rounded = np.maximum.accumulate(rounded)
        return [int(c) for c in np.diff(rounded, prepend=0)]

    def minus(self, earlier: Histogram) -> Histogram:
        """The values added since ``earlier``, an older copy of this same cumulative histogram.

        Counts, zero count and sum are exact differences. The delta's min and max cannot be known
        exactly: when this histogram's min (max) moved past ``earlier``'s, the new extreme is in the
        delta and is used; otherwise min is the lower bound of the lowest non-empty delta bucket and
        max the upper bound of the highest, clamped to ``[self.min, self.max]`` (0 for a delta of
        zeros only). Raises ``ValueError`` when ``earlier`` holds values this one does not.

        >>> before = Histogram.of([0.1, 0.2])
        >>> after = before.copy(); after.merge(Histogram.of([0.4]))
        >>> after.minus(before).count
        1
        """
        a, b = self, earlier
        if a.scale != b.scale:
            coarse = min(a.scale, b.scale)
            a, b = a._downscale_by(a.scale - coarse), b._downscale_by(b.scale - coarse)
        delta = Histogram.empty(a.scale)
        delta.zero_count = a.zero_count - b.zero_count
        delta.count = a.count - b.count
        a_offset, a_counts = a._trimmed()
        b_offset, b_counts = b._trimmed()
        if a_counts.size:
            delta._add_counts(a_offset, a_counts)
        if b_counts.size:
            delta._add_counts(b_offset, -b_counts)
        if delta.zero_count < 0 or delta.count < 0 or (delta.counts < 0).any():
            raise ValueError(
                "earlier is not an older state of this histogram: it holds values this one lacks"
            )
        delta.offset, delta.counts = delta._trimmed()
        delta.counts = delta.counts.copy()
        if delta.count == 0:
            return delta
        delta.sum = max(a.sum - b.sum, 0.0)  # float rounding must not make a sum of durations negative
        if delta.zero_count:
            delta.min = 0.0
        elif self.min < earlier.min:
            delta.min = self.min
        else:
            delta.min = min(max(float(_bucket_lower_bound(delta.offset, delta.scale)), self.min), self.max)
        if delta.counts.size == 0:
            delta.max = 0.0
        elif self.max > earlier.max:
            delta.max = self.max
        else:
            top = delta.offset + delta.counts.size
            delta.max = max(min(float(_bucket_lower_bound(top, delta.scale)), self.max), self.min)
        return delta


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


class Aggregator:
    """The one source of truth for numbers: per-series histograms and counts of everything drained.

    ``add()`` runs on the drainer thread; ``view()`` on exporter and user threads. One lock guards the
    series; ``add()`` does its numpy work before taking it.

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

    def __init__(self, registry: KeyRegistry, *, start_time_unix_nano: int | None = None) -> None:
        self.registry = registry
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

    def _add(self, records: np.ndarray) -> None:
        scratch = self._scratch
        size = records.size
        rows, series_ids = _series_rows(records["key"], records["error"], scratch)
        row_count = series_ids.size
        fresh = self._fresh_series(series_ids)

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

        with self._lock:
            for sid, series in fresh.items():
                self._series.setdefault(sid, series)
            for row, sid in enumerate(series_ids.tolist()):
                series = self._series[sid]
                duration.merge_row_into(row, series.duration)
                if cpu is not None and cpu_wall is not None and cpu.value_count[row]:
                    if series.cpu is None:
                        series.cpu = Histogram.empty()
                    cpu.merge_row_into(row, series.cpu)
                    series.cpu_wall_seconds += float(cpu_wall[row])
                if abandoned is not None:
                    series.abandoned += int(abandoned[row])
                if counter_sums is not None:
                    series.counters += counter_sums[row]

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


@dataclass(frozen=True)
class StatsRow:
    """Summary of one model (or one stage of it): every series of its key(s), success and errors."""

    model: str | None
    version: str | None
    stage: str | None  # None = the inference itself
    count: int
    errors: int
    abandoned: int
    p50: float  # seconds; nan when count == 0
    p90: float
    p95: float
    p99: float
    max: float
    mean: float
    #: Thread CPU summed over the calls whose CPU was read (``cpu_sampled_count`` of them: every
    #: inference, a sample of a busy stage's entries; docs/counters.md); None if not measured.
    cpu_seconds: float | None
    cpu_ratio: float | None  # cpu_seconds / wall seconds over the records where CPU was measured
    error_types: Mapping[str, int]
    #: The row of the overflow key: everything interned past the key cap (model and stage are None).
    overflow: bool = False
    #: Totals of the counters beyond the clocks (``counters="full"`` and friends), e.g.
    #: ``{"context_switches.voluntary": 12, "page_faults.minor": 3051, "memory.rss.change": 4096}``.
    counters: Mapping[str, int] = field(default_factory=dict)
    #: Device time of a stage marked ``device="cuda"`` (CUDA events): how many were measured, their
    #: p50 and p95 in seconds, and the total. 0, nan, nan and None when none was.
    gpu_count: int = 0
    gpu_p50: float = math.nan
    gpu_p95: float = math.nan
    gpu_seconds: float | None = None
    #: How many calls had their CPU read: ``count`` for inferences; for a stage every entry while
    #: the stage is entered less than about 100 times a second, and fewer above.
    cpu_sampled_count: int = 0

    @property
    def cpu_per_call(self) -> float | None:
        """Thread CPU seconds per call, over the calls whose CPU was read."""
        if self.cpu_seconds is None or self.cpu_sampled_count == 0:
            return None
        return self.cpu_seconds / self.cpu_sampled_count

    def to_dict(self) -> dict[str, object]:
        """The row as JSON-ready values (nan becomes None)."""

        def clean(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else value

        return {
            "model": self.model,
            "version": self.version,
            "stage": self.stage,
            "overflow": self.overflow,
            "count": self.count,
            "errors": self.errors,
            "abandoned": self.abandoned,
            "p50_seconds": clean(self.p50),
            "p90_seconds": clean(self.p90),
            "p95_seconds": clean(self.p95),
            "p99_seconds": clean(self.p99),
            "max_seconds": clean(self.max),
            "mean_seconds": clean(self.mean),
            "cpu_seconds": clean(self.cpu_seconds),
            "cpu_ratio": clean(self.cpu_ratio),
            "cpu_sampled_count": self.cpu_sampled_count,
            "cpu_per_call_seconds": clean(self.cpu_per_call),
            "error_types": dict(self.error_types),
            "counters": dict(self.counters),
            "gpu_count": self.gpu_count,
            "gpu_p50_seconds": clean(self.gpu_p50),
            "gpu_p95_seconds": clean(self.gpu_p95),
            "gpu_seconds": clean(self.gpu_seconds),
        }


_ANY_VERSION: Any = object()


def _row_label(row: StatsRow) -> tuple[str, str]:
    if row.overflow:
        return "(overflow: keys past the cap)", "-"
    model = "(no model)" if row.model is None else row.model
    if row.version is not None:
        model = f"{model} v{row.version}"
    return model, "-" if row.stage is None else row.stage


def _millis(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _per_call(row: StatsRow, names: Sequence[str], scale: float = 1.0, digits: int = 1) -> str:
    present = [row.counters[n] for n in names if n in row.counters]
    if not present or not row.count:
        return "-"
    return f"{sum(present) / row.count * scale:.{digits}f}"


def _off_cpu_millis(row: StatsRow) -> str:
    # Wall time not spent on the calling thread's CPU: waiting for a core, a lock, I/O or helpers.
    if row.cpu_ratio is None or math.isnan(row.mean):
        return "-"
    return _millis(max(0.0, row.mean * (1.0 - row.cpu_ratio)))


#: Optional columns of :meth:`Snapshot.table`: name -> (header, cell of a row).
TABLE_COLUMNS: dict[str, tuple[str, Callable[[StatsRow], str]]] = {
    "off_cpu": ("off-cpu ms", _off_cpu_millis),
    "switches": (
        "switches",
        lambda r: _per_call(r, ("context_switches.voluntary", "context_switches.involuntary")),
    ),
    "faults": ("faults", lambda r: _per_call(r, ("page_faults.minor", "page_faults.major"))),
    "rss": ("rss KiB", lambda r: _per_call(r, ("memory.rss.change",), 1 / 1024)),
    "heap": ("heap KiB", lambda r: _per_call(r, ("memory.python_heap.change",), 1 / 1024)),
    "gpu": ("gpu p50 ms", lambda r: _millis(r.gpu_p50)),
}


@dataclass(frozen=True)
class Snapshot:
    """Per-model and per-stage statistics at one moment, as returned by ``inferscope.snapshot()``.

    >>> snap = inferscope.snapshot()  # doctest: +SKIP
    >>> snap.row("fraud", "preprocess").p95  # doctest: +SKIP
    0.0021
    """

    rows: tuple[StatsRow, ...]  # by model (None last), the inference row before its stages, stages by path
    dropped: Mapping[str, int]
    keys_overflowed: int
    backend: str  # "c" or "python"

    def row(
        self, model: str | None, stage: str | None = None, *, version: str | None = _ANY_VERSION
    ) -> StatsRow:
        """The row of ``model`` (and ``stage``, None for the inference itself).

        ``version`` is needed only when the model was tracked under several versions. ``row(None)``
        finds the overflow row when no other row has neither model nor stage.
        """
        matches = [r for r in self.rows if r.model == model and r.stage == stage]
        if version is not _ANY_VERSION:
            matches = [r for r in matches if r.version == version]
        if len(matches) > 1:
            regular = [r for r in matches if not r.overflow]
            if len(regular) == 1:
                return regular[0]
            versions = sorted(str(r.version) for r in matches)
            raise KeyError(
                f"{len(matches)} rows match model={model!r}, stage={stage!r} (versions {versions}); "
                "pass version="
            )
        if matches:
            return matches[0]
        available = sorted({f"({r.model!r}, {r.stage!r})" for r in self.rows})
        hint = ", ".join(available) if available else "none: nothing has been recorded yet"
        wanted = f"model={model!r}, stage={stage!r}"
        if version is not _ANY_VERSION:
            wanted += f", version={version!r}"
        raise KeyError(f"no snapshot row for {wanted}; rows present (model, stage): {hint}")

    def table(self, columns: Sequence[str] = ()) -> str:
        """An aligned text table: model, stage, count, p50/p95/p99 in ms, cpu/wall, errors, and the
        p50 of the device time when a stage marked ``device="cuda"`` measured one.

        ``columns`` adds figures per call from :data:`TABLE_COLUMNS`, for a terminal that shows
        more than latency: ``off_cpu`` (ms of wall time not on the CPU: waiting), ``switches``,
        ``faults``, ``rss`` (KiB of RSS change), ``heap`` (KiB of Python heap change) and ``gpu``.
        A figure that was not measured shows as ``-``.

        >>> print(inferscope.snapshot().table(columns=["off_cpu", "switches"]))  # doctest: +SKIP
        """
        unknown = [c for c in columns if c not in TABLE_COLUMNS]
        if unknown:
            raise ValueError(
                f"table(columns=...): unknown column {unknown[0]!r}; accepted: {', '.join(TABLE_COLUMNS)}"
            )
        extra = list(dict.fromkeys(columns))
        if any(r.gpu_count for r in self.rows) and "gpu" not in extra:
            extra.append("gpu")
        header: tuple[str, ...] = (
            "model",
            "stage",
            "count",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "cpu/wall",
            "errors",
            *(TABLE_COLUMNS[c][0] for c in extra),
        )
        lines: list[tuple[str, ...]] = [header]
        for r in self.rows:
            model, stage = _row_label(r)
            if r.stage is not None and not r.overflow:
                stage = "  " * r.stage.count("/") + stage
            ratio = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}"
            lines.append(
                (
                    model,
                    stage,
                    str(r.count),
                    _millis(r.p50),
                    _millis(r.p95),
                    _millis(r.p99),
                    ratio,
                    str(r.errors),
                    *(TABLE_COLUMNS[c][1](r) for c in extra),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = []
        for line in lines:
            cells = [
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            text.append("  ".join(cells).rstrip())
        dropped = sum(self.dropped.values())
        if dropped:
            reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.dropped.items()) if n)
            text.append(f"dropped records: {dropped} ({reasons})")
        if self.keys_overflowed:
            text.append(f"keys past the cap (folded into the overflow row): {self.keys_overflowed}")
        text.append(f"backend: {self.backend}")
        return "\n".join(text)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form: ``json.dumps(snapshot.to_dict())`` works (nan becomes null)."""
        return {
            "backend": self.backend,
            "dropped": dict(self.dropped),
            "keys_overflowed": self.keys_overflowed,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass
class _RowAccumulator:
    duration: Histogram = field(default_factory=Histogram.empty)
    cpu: Histogram | None = None
    cpu_wall_seconds: float = 0.0
    errors: int = 0
    abandoned: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    counters: np.ndarray = field(default_factory=lambda: np.zeros(COUNTER_SLOTS, np.int64))
    gpu: Histogram | None = None


def build_snapshot(view: AggregateView, backend: str, counters: Sequence[CounterMetric] = ()) -> Snapshot:
    """One row per (model, version, stage), merging success and every error series.

    Keys that differ only in their extra attributes share a row; the overflow key gets a row of its
    own (``overflow=True``, model and stage None).
    """
    groups: dict[tuple[bool, str | None, str | None, str | None], _RowAccumulator] = {}
    for series in view.series:
        info = series.info
        acc = groups.setdefault((info.overflow, info.model, info.version, info.stage), _RowAccumulator())
        acc.duration.merge(series.duration)
        if series.cpu is not None:
            if acc.cpu is None:
                acc.cpu = Histogram.empty(series.cpu.scale)
            acc.cpu.merge(series.cpu)
            acc.cpu_wall_seconds += series.cpu_wall_seconds
        if series.gpu is not None:
            if acc.gpu is None:
                acc.gpu = Histogram.empty(series.gpu.scale)
            acc.gpu.merge(series.gpu)
        acc.abandoned += series.abandoned
        acc.counters += series.counters
        if series.error_id != NO_ERROR:
            acc.errors += series.duration.count
            name = series.error_type or f"error#{series.error_id}"
            acc.error_types[name] = acc.error_types.get(name, 0) + series.duration.count

    rows = []
    for (overflow, model, version, stage), acc in groups.items():
        d = acc.duration
        empty = d.count == 0
        cpu_seconds = None if acc.cpu is None else acc.cpu.sum
        cpu_ratio = None
        if cpu_seconds is not None and acc.cpu_wall_seconds > 0:
            cpu_ratio = cpu_seconds / acc.cpu_wall_seconds
        rows.append(
            StatsRow(
                model=model,
                version=version,
                stage=stage,
                count=d.count,
                errors=acc.errors,
                abandoned=acc.abandoned,
                p50=d.quantile(0.5),
                p90=d.quantile(0.9),
                p95=d.quantile(0.95),
                p99=d.quantile(0.99),
                max=math.nan if empty else d.max,
                mean=math.nan if empty else d.sum / d.count,
                cpu_seconds=cpu_seconds,
                cpu_ratio=cpu_ratio,
                error_types=dict(sorted(acc.error_types.items())),
                overflow=overflow,
                counters={
                    counter_label(c): counter_value(c, acc.counters, d.count)
                    for c in counters_of(counters, "inference" if stage is None else "stage")
                },
                cpu_sampled_count=0 if acc.cpu is None else acc.cpu.count,
                gpu_count=0 if acc.gpu is None else acc.gpu.count,
                gpu_p50=math.nan if acc.gpu is None else acc.gpu.quantile(0.5),
                gpu_p95=math.nan if acc.gpu is None else acc.gpu.quantile(0.95),
                gpu_seconds=None if acc.gpu is None else acc.gpu.sum,
            )
        )

    def order(r: StatsRow) -> tuple[object, ...]:
        return (
            r.model is None,
            r.model or "",
            r.overflow,
            r.version is None,
            r.version or "",
            r.stage is not None,
            r.stage or "",
        )

    rows.sort(key=order)
    return Snapshot(tuple(rows), dict(view.dropped), view.keys_overflowed, backend)
