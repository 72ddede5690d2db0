"""Base-2 exponential histograms in the OpenTelemetry ``ExponentialHistogram`` bucket layout.

Durations, thread CPU times and device times land in base-2 exponential histograms with the
OpenTelemetry ``ExponentialHistogram`` bucket layout at a fixed scale (:data:`SCALE`), so exporters
can hand the buckets to OTel unchanged (downscaling only when a histogram has more buckets than the
configured maximum).

This module holds the bucket math (:func:`bucket_indices`: exact integer table lookups, no ``log2``
at the scales in use) and :class:`Histogram` (merge, quantiles, downscaling, explicit-bucket counts,
deltas). It needs numpy alone, so the aggregator, the windows, the exporters and the baselines share
it without pulling in one another.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MIN_SCALE", "SCALE", "Histogram", "bucket_indices"]

#: The fixed scale of every histogram the aggregator builds: bucket ``i`` holds
#: ``(2**(i/64), 2**((i+1)/64)]`` seconds, so the relative error of any quantile estimate is at most
#: ``2**(1/128) - 1`` (about 0.54%).
SCALE = 6

#: The lowest scale OTel allows; at scale -10 two buckets cover every positive float64.
MIN_SCALE = -10


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
