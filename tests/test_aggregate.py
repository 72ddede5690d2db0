"""Tests for inferscope.histogram, .aggregator and .snapshots: OTel bucket layout, quantiles,
vectorised add(), snapshot rows.

Expected values come from independent computations: exact integer arithmetic for bucket indices,
``numpy.percentile`` for quantiles, and a slow per-record Python loop for whole aggregations.
"""

from __future__ import annotations

import importlib
import json
import math
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest

from inferscope._keys import KeyRegistry
from inferscope._records import (
    COUNTER_SLOTS,
    CPU_NOT_MEASURED,
    DROP_RING_FULL,
    DROP_STACK_DEPTH,
    FLAG_ABANDONED,
    OVERFLOW_KEY,
    empty_records,
)
from inferscope.aggregator import Aggregator, Series
from inferscope.histogram import SCALE, Histogram, bucket_indices
from inferscope.snapshots import build_snapshot

BASE = 2.0 ** (2.0**-SCALE)

# OTel's default explicit boundaries (milliseconds), in seconds.
OTEL_DEFAULT_BOUNDARIES = [
    b / 1000 for b in (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
]


class CustomError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# Independent reference: the OTel bucket index by exact rational arithmetic.


def otel_index(value: float, scale: int) -> int:
    """The i with base**i < value <= base**(i+1), base = 2**(2**-scale), by exact integer arithmetic."""
    if scale < 0:
        return otel_index(value, 0) >> -scale
    # value = n / 2**d exactly, so value <= base**(i+1) <=> n**P <= 2**(i + 1 + d*P) with P = 2**scale,
    # and the least such i + 1 is ceil(log2(n**P)) - d*P, where ceil(log2(N)) = (N - 1).bit_length().
    numerator, denominator = value.as_integer_ratio()
    power = 2**scale
    return int((numerator**power - 1).bit_length() - (denominator.bit_length() - 1) * power - 1)


def below(value: float) -> float:
    return math.nextafter(value, 0.0)


def above(value: float) -> float:
    return math.nextafter(value, math.inf)


def bucket_map(hist: Histogram) -> dict[int, int]:
    """Non-empty buckets as {OTel index: count}, independent of padding."""
    return {hist.offset + i: int(c) for i, c in enumerate(hist.counts) if c}


def reference_buckets(values: Iterable[float], scale: int = SCALE) -> dict[int, int]:
    return dict(Counter(otel_index(v, scale) for v in values if v > 0))


def assert_same_distribution(a: Histogram, b: Histogram) -> None:
    assert a.scale == b.scale
    assert bucket_map(a) == bucket_map(b)
    assert (a.count, a.zero_count, a.min, a.max) == (b.count, b.zero_count, b.min, b.max)
    assert a.sum == pytest.approx(b.sum, rel=1e-12, abs=1e-15)


def make_records(
    rng: np.random.Generator,
    n: int,
    keys: list[int],
    error_ids: list[int],
    *,
    error_share: float = 0.1,
    cpu_share: float = 0.5,
) -> np.ndarray:
    """Random records over ``keys``: some errors, some zero or negative walls, cpu -1 or >= 0."""
    records = empty_records(n)
    records["key"] = rng.choice(keys, n)
    failed = rng.random(n) < error_share
    records["error"][failed] = rng.choice(error_ids, int(failed.sum()))
    records["flags"][rng.random(n) < 0.05] = FLAG_ABANDONED
    wall_ns = (rng.lognormal(-6, 2, n) * 1e9).astype(np.int64)
    wall_ns[rng.random(n) < 0.02] = 0
    wall_ns[rng.random(n) < 0.01] = -5  # a clock step; counts as 0
    records["wall_ns"] = wall_ns
    measured = rng.random(n) < cpu_share
    cpu_ns = np.where(measured, (np.maximum(wall_ns, 0) * rng.random(n)).astype(np.int64), CPU_NOT_MEASURED)
    cpu_ns[measured & (rng.random(n) < 0.05)] = 0
    records["cpu_ns"] = cpu_ns
    records["counters"] = rng.integers(0, 1000, (n, COUNTER_SLOTS))
    records["start_ns"] = np.arange(n)
    return records


@pytest.fixture
def registry() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture
def keys(registry: KeyRegistry) -> list[int]:
    fraud = registry.inference_key("fraud", "3")
    ranker = registry.inference_key("ranker")
    infer = registry.stage_key(fraud, "infer")
    return [fraud, ranker, infer, registry.stage_key(infer, "encoder"), registry.stage_key(ranker, "pre")]


@pytest.fixture
def error_ids(registry: KeyRegistry) -> list[int]:
    return [registry.error_id(ValueError), registry.error_id(KeyError), registry.error_id(CustomError)]


# ---------------------------------------------------------------------------------------------------
# Bucket indices


@pytest.mark.parametrize("exponent", range(-40, 41))
def test_bucket_index_at_and_around_powers_of_two(exponent: int) -> None:
    value = math.ldexp(1.0, exponent)
    per_octave = 2**SCALE
    # OTel: base**i < v <= base**(i+1); 2**e is the upper bound of bucket e * 2**scale - 1.
    got = bucket_indices(np.array([below(value), value, above(value)]))
    assert got.tolist() == [exponent * per_octave - 1, exponent * per_octave - 1, exponent * per_octave]


@pytest.mark.parametrize("scale", [-3, -1, 0, 1, 3, SCALE, 8, 10])
def test_bucket_index_matches_exact_arithmetic(scale: int) -> None:
    rng = np.random.default_rng(scale + 100)
    per_octave = 2 ** max(scale, 0)
    # The floats nearest to (irrational) bucket boundaries are where a log2-based index goes wrong.
    ks = set(range(0, per_octave, max(1, per_octave // 64))) | set(rng.integers(0, per_octave, 64).tolist())
    boundaries = [math.ldexp(2.0 ** (k / per_octave), e) for k in sorted(ks) for e in (-1060, -30, -1, 0, 9)]
    near = [f(b) for b in boundaries for f in (below, float, above)]
    values = np.concatenate([rng.lognormal(0, 8, 500), near, [5e-324, 1e-310, math.ldexp(1.0, -1030)]])
    got = bucket_indices(values, scale)
    expected = [otel_index(v, scale) for v in values]
    mismatches = [(float(v), int(g), e) for v, g, e in zip(values, got, expected, strict=True) if g != e]
    assert mismatches == []


def test_add_places_exact_second_values_in_otel_buckets(registry: KeyRegistry) -> None:
    key = registry.inference_key("m")
    records = empty_records(4)
    records["key"] = key
    records["wall_ns"] = [250_000_000, 1_000_000_000, 1_000_000_001, 2_000_000_000]  # 2**-2, 1, >1, 2 s
    aggregator = Aggregator(registry)
    aggregator.add(records)
    (series,) = aggregator.view().series
    expected = {-2 * 64 - 1: 1, -1: 1, otel_index(1.000000001, SCALE): 1, 63: 1}
    assert bucket_map(series.duration) == expected


# ---------------------------------------------------------------------------------------------------
# Quantiles


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_quantiles_match_numpy_percentile(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=-4.0, sigma=rng.uniform(0.3, 2.0), size=200_000)
    hist = Histogram.of(values)
    for q in (0.5, 0.9, 0.95, 0.99):
        expected = float(np.percentile(values, q * 100))
        got = hist.quantile(q)
        assert abs(got - expected) / expected <= 0.01, f"seed={seed} q={q}: {got} vs numpy {expected}"


@pytest.mark.parametrize("seed", [10, 11])
def test_quantiles_of_aggregated_records_match_numpy_percentile(seed: int, registry: KeyRegistry) -> None:
    rng = np.random.default_rng(seed)
    records = empty_records(200_000)
    records["key"] = registry.inference_key("m")
    records["wall_ns"] = (rng.lognormal(-5, 1, records.size) * 1e9).astype(np.int64)
    aggregator = Aggregator(registry)
    aggregator.add(records)
    hist = aggregator.view().series[0].duration
    seconds = records["wall_ns"] / 1e9
    for q in (0.5, 0.9, 0.95, 0.99):
        expected = float(np.percentile(seconds, q * 100))
        assert abs(hist.quantile(q) - expected) / expected <= 0.01, f"seed={seed} q={q}"


def test_quantile_edges() -> None:
    values = [0.003, 0.001, 0.002, 0.0]
    hist = Histogram.of(values)
    assert hist.quantile(0.0) == 0.0
    assert hist.quantile(1.0) == 0.003
    assert math.isnan(Histogram.empty().quantile(0.5))
    with pytest.raises(ValueError, match="q must be in"):
        hist.quantile(1.5)
    # The bucket estimate never leaves [min, max], even for one value far from its bucket's midpoint.
    single = Histogram.of([1.0])
    assert single.quantile(0.5) == 1.0


def test_quantile_small_sample_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    hist = Histogram.of(values)
    for q in (0.1, 0.25, 0.5, 0.6, 0.75, 0.9):
        expected = float(np.percentile(values, q * 100))
        assert abs(hist.quantile(q) - expected) / expected <= BASE - 1, q


# ---------------------------------------------------------------------------------------------------
# Vectorised add() against a per-record reference


@dataclass
class RefSeries:
    durations: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    cpu_wall: float = 0.0
    abandoned: int = 0
    counters: list[int] = field(default_factory=lambda: [0] * COUNTER_SLOTS)


def reference_aggregate(records: np.ndarray) -> dict[tuple[int, int], RefSeries]:
    result: dict[tuple[int, int], RefSeries] = defaultdict(RefSeries)
    for record in records.tolist():  # (key, error, flags, start, wall, cpu, counters)
        key, error, flags, _start, wall_ns, cpu_ns, counters = record[:7]
        series = result[(key, error)]
        wall = max(wall_ns, 0) / 1e9
        series.durations.append(wall)
        if cpu_ns >= 0:
            series.cpu.append(cpu_ns / 1e9)
            series.cpu_wall += wall
        if flags & FLAG_ABANDONED:
            series.abandoned += 1
        series.counters = [a + b for a, b in zip(series.counters, counters, strict=True)]
    return result


def assert_histogram_of(hist: Histogram, values: list[float]) -> None:
    assert hist.scale == SCALE
    assert hist.count == len(values)
    assert hist.zero_count == sum(1 for v in values if v == 0)
    assert bucket_map(hist) == reference_buckets(values)
    assert hist.sum == pytest.approx(math.fsum(values), rel=1e-12, abs=1e-15)
    assert hist.min == min(values)
    assert hist.max == max(values)


def assert_matches_reference(series: tuple[Series, ...], records: np.ndarray, registry: KeyRegistry) -> None:
    expected = reference_aggregate(records)
    assert [(s.info.key, s.error_id) for s in series] == sorted(expected)
    for s in series:
        ref = expected[(s.info.key, s.error_id)]
        assert s.info == registry.info(s.info.key)
        assert s.error_type == (None if s.error_id == 0 else registry.error_name(s.error_id))
        assert_histogram_of(s.duration, ref.durations)
        if ref.cpu:
            assert s.cpu is not None
            assert_histogram_of(s.cpu, ref.cpu)
        else:
            assert s.cpu is None
        assert s.cpu_wall_seconds == pytest.approx(ref.cpu_wall, rel=1e-12, abs=1e-15)
        assert s.abandoned == ref.abandoned
        assert s.counters.tolist() == ref.counters


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_matches_per_record_reference(
    seed: int, registry: KeyRegistry, keys: list[int], error_ids: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    records = make_records(rng, 3000, keys, error_ids)
    aggregator = Aggregator(registry)
    aggregator.add(records)
    assert_matches_reference(aggregator.view().series, records, registry)


@pytest.mark.parametrize("cpu_share", [0.0, 1.0])
def test_add_with_cpu_never_or_always_measured(
    cpu_share: float, registry: KeyRegistry, keys: list[int], error_ids: list[int]
) -> None:
    records = make_records(np.random.default_rng(7), 1000, keys, error_ids, cpu_share=cpu_share)
    aggregator = Aggregator(registry)
    aggregator.add(records)
    series = aggregator.view().series
    assert_matches_reference(series, records, registry)
    assert all((s.cpu is None) == (cpu_share == 0.0) for s in series)


def test_add_without_errors_or_counters(registry: KeyRegistry, keys: list[int]) -> None:
    records = make_records(np.random.default_rng(8), 1000, keys, [0], error_share=0.0)
    records["counters"] = 0
    aggregator = Aggregator(registry)
    aggregator.add(records)
    assert_matches_reference(aggregator.view().series, records, registry)


def test_add_with_many_keys_and_error_types_takes_the_sort_path() -> None:
    # Enough keys and error types that a dense (key, error) lookup table would be too large.
    registry = KeyRegistry(max_keys=10_000)
    many_keys = [registry.inference_key(f"m{i}") for i in range(6000)]
    many_errors = [registry.error_id(type(f"E{i}", (Exception,), {})) for i in range(200)]
    rng = np.random.default_rng(9)
    records = make_records(rng, 2000, many_keys, many_errors, error_share=0.9)
    aggregator = Aggregator(registry)
    aggregator.add(records)
    assert_matches_reference(aggregator.view().series, records, registry)


def test_add_in_batches_equals_one_batch(
    registry: KeyRegistry, keys: list[int], error_ids: list[int]
) -> None:
    records = make_records(np.random.default_rng(3), 5000, keys, error_ids)
    whole = Aggregator(registry)
    whole.add(records)
    pieces = Aggregator(registry)
    for chunk in np.array_split(records, [1, 700, 701, 2500, 4999]):
        pieces.add(chunk)
    pieces.add(records[:0])
    a, b = whole.view().series, pieces.view().series
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert (sa.info, sa.error_id, sa.abandoned) == (sb.info, sb.error_id, sb.abandoned)
        assert_same_distribution(sa.duration, sb.duration)
        assert (sa.cpu is None) == (sb.cpu is None)
        if sa.cpu is not None and sb.cpu is not None:
            assert_same_distribution(sa.cpu, sb.cpu)
        assert sa.counters.tolist() == sb.counters.tolist()


def test_add_with_unknown_key_raises_and_changes_nothing(registry: KeyRegistry, keys: list[int]) -> None:
    aggregator = Aggregator(registry)
    good = make_records(np.random.default_rng(4), 100, keys, [0], error_share=0.0)
    aggregator.add(good)
    before = aggregator.view()
    bad = good.copy()
    bad["key"][-1] = len(registry) + 5
    with pytest.raises(IndexError):
        aggregator.add(bad)
    after = aggregator.view()
    assert [s.duration for s in after.series] == [s.duration for s in before.series]


def test_overflow_key_is_its_own_series() -> None:
    registry = KeyRegistry(max_keys=3)
    kept = registry.inference_key("kept")
    folded = registry.inference_key("past-the-cap")
    assert folded == OVERFLOW_KEY
    records = empty_records(3)
    records["key"] = [kept, folded, folded]
    records["wall_ns"] = 1_000_000
    aggregator = Aggregator(registry)
    aggregator.add(records)
    view = aggregator.view()
    assert [(s.info.key, s.info.overflow, s.duration.count) for s in view.series] == [
        (OVERFLOW_KEY, True, 2),
        (kept, False, 1),
    ]
    assert view.keys_overflowed == 1


# ---------------------------------------------------------------------------------------------------
# merge / downscaled / explicit buckets / minus


def test_merge_adds_distributions() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.lognormal(-3, 1, 1000), rng.lognormal(1, 1, 500)
    merged = Histogram.of(a)
    merged.merge(Histogram.of(np.append(b, 0.0)))
    assert_same_distribution(merged, Histogram.of(np.concatenate([a, b, [0.0]])))
    unchanged = merged.copy()
    merged.merge(Histogram.empty())
    assert merged == unchanged


def test_merge_of_different_scales_downscales_the_finer() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.lognormal(-3, 1, 1000), rng.lognormal(-2, 1, 1000)
    fine = Histogram.of(a, scale=SCALE)
    fine.merge(Histogram.of(b, scale=2))
    assert_same_distribution(fine, Histogram.of(np.concatenate([a, b]), scale=2))
    coarse = Histogram.of(a, scale=2)
    coarse.merge(Histogram.of(b, scale=SCALE))
    assert_same_distribution(coarse, Histogram.of(np.concatenate([a, b]), scale=2))


@pytest.mark.parametrize("max_buckets", [1, 2, 3, 7, 20, 160, 10_000])
def test_downscaled_fits_and_matches_otel_merge_rule(max_buckets: int) -> None:
    rng = np.random.default_rng(max_buckets)
    values = np.append(rng.lognormal(-5, 0.3 if max_buckets == 1 else 2.0, 5000), 0.0)
    hist = Histogram.of(values)
    before = hist.copy()
    small = hist.downscaled(max_buckets)
    assert hist == before  # self unchanged
    assert (small.count, small.zero_count, small.sum, small.min, small.max) == (
        hist.count,
        hist.zero_count,
        hist.sum,
        hist.min,
        hist.max,
    )
    occupied = bucket_map(small)
    assert max(occupied) - min(occupied) + 1 <= max_buckets
    # OTel: the index at scale s - n is the index at scale s shifted right by n, so downscaling
    # must equal bucketing the raw values at the coarser scale directly.
    assert occupied == reference_buckets(values, small.scale)
    # ... and no finer scale would have fit.
    if small.scale < SCALE:
        finer = reference_buckets(values, small.scale + 1)
        assert max(finer) - min(finer) + 1 > max_buckets


def test_downscaled_raises_when_nothing_fits() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        Histogram.of([0.5, 2.0]).downscaled(1)  # bucket -1 and 0 even at the coarsest scale
    with pytest.raises(ValueError):
        Histogram.of([0.5]).downscaled(0)
    assert Histogram.empty().downscaled(1).count == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explicit_bucket_counts_agree_with_raw_counting(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.lognormal(-3, 1.5, 20_000), np.zeros(37)])
    hist = Histogram.of(values)
    counts = hist.explicit_bucket_counts(OTEL_DEFAULT_BOUNDARIES)
    assert len(counts) == len(OTEL_DEFAULT_BOUNDARIES) + 1
    assert sum(counts) == hist.count
    assert all(c >= 0 for c in counts)
    cumulative = np.cumsum(counts)
    for b, ours in zip(OTEL_DEFAULT_BOUNDARIES, cumulative, strict=False):
        # The split is exact up to the values within one exponential bucket of the boundary.
        surely_below = (
            int(np.count_nonzero(values <= b / BASE)) if b > 0 else int(np.count_nonzero(values <= b))
        )
        possibly_below = int(np.count_nonzero(values <= b * BASE)) if b > 0 else surely_below
        assert surely_below <= ours <= possibly_below, f"seed={seed} boundary={b}"


def test_explicit_bucket_counts_zeros_and_far_boundaries() -> None:
    hist = Histogram.of([0.0, 0.0, 0.0011, 0.0015, 0.0019])
    # zeros go to the first bucket whose upper bound is >= 0
    assert hist.explicit_bucket_counts([-1.0, 0.0, 0.01]) == [0, 2, 3, 0]
    assert hist.explicit_bucket_counts([-2.0, -1.0]) == [0, 0, 5]
    assert hist.explicit_bucket_counts([0.0005, 0.005]) == [2, 3, 0]
    assert hist.explicit_bucket_counts([]) == [5]
    assert Histogram.empty().explicit_bucket_counts([0.1, 1.0]) == [0, 0, 0]
    with pytest.raises(ValueError, match="strictly increasing"):
        hist.explicit_bucket_counts([1.0, 0.5])


@pytest.mark.parametrize(("low_part", "high_part", "boundary_part"), [(0.0, 1.0, 0.25), (0.75, 1.0, 0.875)])
def test_explicit_bucket_split_is_proportional_in_log_space(
    low_part: float, high_part: float, boundary_part: float
) -> None:
    # 1000 values spread evenly in log space over a part of one exponential bucket; the split of a
    # boundary inside follows log space within the observed [min, max], not the whole bucket.
    index = 10
    values = BASE ** (index + np.linspace(low_part, high_part, 1002)[1:-1])
    hist = Histogram.of(values)
    assert bucket_map(hist) == {index: 1000}
    boundary = BASE ** (index + boundary_part)
    below_boundary, above_boundary = hist.explicit_bucket_counts([boundary])
    true_below = int(np.count_nonzero(values <= boundary))
    assert abs(below_boundary - true_below) <= 2
    assert below_boundary + above_boundary == 1000


@pytest.mark.parametrize("seed", [0, 1])
def test_minus_gives_the_delta_of_cumulative_states(
    seed: int, registry: KeyRegistry, keys: list[int], error_ids: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    first = make_records(rng, 2000, keys[:1], [0], error_share=0.0)
    second = make_records(rng, 1500, keys[:1], [0], error_share=0.0)
    aggregator = Aggregator(registry)
    aggregator.add(first)
    earlier = aggregator.view().series[0].duration
    aggregator.add(second)
    later = aggregator.view().series[0].duration
    delta = later.minus(earlier)
    only_second = np.maximum(second["wall_ns"], 0) / 1e9
    assert delta.count == only_second.size
    assert delta.zero_count == int(np.count_nonzero(only_second == 0))
    assert bucket_map(delta) == reference_buckets(only_second.tolist())
    assert delta.sum == pytest.approx(float(only_second.sum()), rel=1e-9)
    # min/max are estimates: within one bucket of the truth, on the documented side.
    true_min, true_max = float(only_second.min()), float(only_second.max())
    assert true_min / BASE <= delta.min <= true_min
    assert true_max <= delta.max <= true_max * BASE
    assert later.min <= delta.min and delta.max <= later.max
    # Comparing against nothing gives the state itself; against itself, nothing.
    assert later.minus(Histogram.empty()) == later
    same = later.minus(later)
    assert (same.count, same.sum, bucket_map(same), same.min, same.max) == (0, 0.0, {}, math.inf, -math.inf)


def test_minus_estimates_extremes_inside_the_earlier_range() -> None:
    rng = np.random.default_rng(12)
    earlier = Histogram.of(rng.uniform(0.001, 1.0, 1000))
    added = rng.uniform(0.01, 0.1, 300)
    later = earlier.copy()
    later.merge(Histogram.of(added))
    delta = later.minus(earlier)
    assert added.min() / BASE <= delta.min <= added.min()
    assert added.max() <= delta.max <= added.max() * BASE
    assert bucket_map(delta) == reference_buckets(added.tolist())


def test_minus_uses_exact_new_extremes() -> None:
    earlier = Histogram.of([0.01, 0.02])
    later = earlier.copy()
    later.merge(Histogram.of([0.005, 0.015, 0.5]))
    delta = later.minus(earlier)
    assert (delta.min, delta.max, delta.count) == (0.005, 0.5, 3)


def test_minus_rejects_a_state_that_is_not_older() -> None:
    earlier = Histogram.of([0.01, 0.02])
    later = Histogram.of([0.01, 0.02, 0.03])
    with pytest.raises(ValueError, match="not an older state"):
        earlier.minus(later)


def test_equality_ignores_padding_but_not_content() -> None:
    a = Histogram.of([0.1, 0.2])
    padded = a.copy()
    padded.offset -= 2
    padded.counts = np.concatenate([[0, 0], a.counts, [0]])
    assert a == padded
    other = a.copy()
    other.counts = other.counts.copy()
    other.counts[0] += 1
    assert a != other


# ---------------------------------------------------------------------------------------------------
# Aggregator view / reset / concurrency


def test_view_returns_copies(registry: KeyRegistry, keys: list[int], error_ids: list[int]) -> None:
    aggregator = Aggregator(registry, start_time_unix_nano=123)
    aggregator.add(make_records(np.random.default_rng(0), 500, keys, error_ids, cpu_share=1.0))
    aggregator.set_dropped(DROP_RING_FULL, 7)
    aggregator.set_internal_errors(2)
    first = aggregator.view()
    snapshot_before = [
        (s.duration.copy(), s.cpu.copy() if s.cpu else None, s.counters.copy()) for s in first.series
    ]
    for s in first.series:
        s.duration.counts += 100
        s.duration.count += 1
        s.duration.merge(Histogram.of([123.0]))
        assert s.cpu is not None
        s.cpu.counts[:] = 0
        s.counters += 5
        s.abandoned += 1
    first.dropped[DROP_RING_FULL] = 0  # type: ignore[index]
    second = aggregator.view()
    for s, (duration, cpu, counters) in zip(second.series, snapshot_before, strict=True):
        assert s.duration == duration
        assert s.cpu == cpu
        assert s.counters.tolist() == counters.tolist()
    assert second.dropped == {DROP_RING_FULL: 7}
    assert (second.internal_errors, second.start_time_unix_nano) == (2, 123)


def test_series_copy_is_deep(registry: KeyRegistry, keys: list[int]) -> None:
    aggregator = Aggregator(registry)
    aggregator.add(make_records(np.random.default_rng(1), 100, keys[:1], [0], error_share=0.0, cpu_share=1.0))
    original = aggregator.view().series[0]
    clone = original.copy()
    clone.duration.counts[:] = 0
    assert clone.cpu is not None
    clone.cpu.counts[:] = 0
    clone.counters[:] = -1
    assert original.duration.counts.sum() > 0
    assert original.cpu is not None and original.cpu.counts.sum() > 0
    assert (original.counters >= 0).all()


def test_set_dropped_keeps_cumulative_totals(registry: KeyRegistry) -> None:
    aggregator = Aggregator(registry)
    aggregator.set_dropped(DROP_RING_FULL, 3)
    aggregator.set_dropped(DROP_RING_FULL, 10)
    aggregator.set_dropped(DROP_STACK_DEPTH, 1)
    assert aggregator.view().dropped == {DROP_RING_FULL: 10, DROP_STACK_DEPTH: 1}


def test_reset_clears_series_and_drop_counts(registry: KeyRegistry, keys: list[int]) -> None:
    aggregator = Aggregator(registry, start_time_unix_nano=1)
    aggregator.add(make_records(np.random.default_rng(2), 100, keys, [0], error_share=0.0))
    aggregator.set_dropped(DROP_RING_FULL, 4)
    aggregator.set_internal_errors(3)
    aggregator.reset(start_time_unix_nano=99)
    view = aggregator.view()
    assert (view.series, dict(view.dropped), view.internal_errors, view.start_time_unix_nano) == (
        (),
        {},
        0,
        99,
    )
    # Keys survive in the registry; new records aggregate from zero.
    records = make_records(np.random.default_rng(3), 10, keys[:1], [0], error_share=0.0)
    aggregator.add(records)
    assert [s.duration.count for s in aggregator.view().series] == [10]


def test_default_start_time_is_now(registry: KeyRegistry) -> None:
    import time

    before = time.time_ns()
    aggregator = Aggregator(registry)
    assert before <= aggregator.view().start_time_unix_nano <= time.time_ns()


def test_concurrent_add_and_view(registry: KeyRegistry, keys: list[int]) -> None:
    aggregator = Aggregator(registry)
    batches = [make_records(np.random.default_rng(i), 2000, keys, [0], error_share=0.0) for i in range(20)]
    totals: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            view = aggregator.view()
            counts = [s.duration.count for s in view.series]
            # Every view is a whole number of batches: add() is atomic with respect to view().
            totals.append(sum(counts))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for batch in batches:
            aggregator.add(batch)
    finally:
        stop.set()
        reader.join()
    assert all(t % 2000 == 0 for t in totals)
    assert sum(s.duration.count for s in aggregator.view().series) == 40_000


# ---------------------------------------------------------------------------------------------------
# build_snapshot / Snapshot


def _records_for(
    key: int, wall_ns: Iterable[int], *, error: int = 0, cpu_ns: Iterable[int] | None = None
) -> np.ndarray:
    walls = np.fromiter(wall_ns, dtype=np.int64)
    records = empty_records(walls.size)
    records["key"] = key
    records["error"] = error
    records["wall_ns"] = walls
    records["cpu_ns"] = CPU_NOT_MEASURED if cpu_ns is None else np.fromiter(cpu_ns, dtype=np.int64)
    return records


def test_build_snapshot_rows() -> None:
    registry = KeyRegistry(max_keys=9)
    fraud = registry.inference_key("fraud", "3")
    pre = registry.stage_key(fraud, "preprocess")
    infer = registry.stage_key(fraud, "infer")
    encoder = registry.stage_key(infer, "encoder")
    alpha = registry.inference_key("alpha")
    loose = registry.stage_key(0, "warmup")  # a stage outside any inference
    value_error, key_error = registry.error_id(ValueError), registry.error_id(KeyError)
    registry.inference_key("x1")
    registry.inference_key("x2")  # past the cap: folds into the overflow key
    assert registry.overflowed == 1

    rng = np.random.default_rng(0)
    ok_wall = (rng.lognormal(-4, 0.5, 5000) * 1e9).astype(np.int64)
    ok_cpu = (ok_wall * 0.25).astype(np.int64)
    batches = [
        _records_for(fraud, ok_wall[:3000], cpu_ns=ok_cpu[:3000]),
        _records_for(fraud, ok_wall[3000:]),  # CPU not measured for these
        _records_for(fraud, [2_000_000] * 7, error=value_error, cpu_ns=[2_000_000] * 7),
        _records_for(fraud, [3_000_000] * 3, error=key_error),
        _records_for(pre, [1_000_000] * 10),
        _records_for(encoder, [4_000_000] * 4),
        _records_for(infer, [5_000_000] * 4),
        _records_for(alpha, [1_000] * 2),
        _records_for(loose, [10_000] * 2),
        _records_for(OVERFLOW_KEY, [20_000] * 5),
    ]
    aggregator = Aggregator(registry)
    for batch in batches:
        aggregator.add(batch)
    aggregator.set_dropped(DROP_RING_FULL, 11)
    snap = build_snapshot(aggregator.view(), "python")

    assert [(r.model, r.stage, r.overflow) for r in snap.rows] == [
        ("alpha", None, False),
        ("fraud", None, False),
        ("fraud", "infer", False),
        ("fraud", "infer/encoder", False),
        ("fraud", "preprocess", False),
        (None, "warmup", False),
        (None, None, True),
    ]
    row = snap.row("fraud")
    assert (row.version, row.count, row.errors) == ("3", 5010, 10)
    assert row.error_types == {"ValueError": 7, "KeyError": 3}
    all_walls = np.concatenate([ok_wall, [2_000_000] * 7, [3_000_000] * 3]) / 1e9
    for q, got in ((0.5, row.p50), (0.9, row.p90), (0.95, row.p95), (0.99, row.p99)):
        expected = float(np.percentile(all_walls, q * 100))
        assert abs(got - expected) / expected <= 0.01, q
    assert row.max == all_walls.max()
    assert row.mean == pytest.approx(all_walls.mean(), rel=1e-12)
    measured_cpu = (ok_cpu[:3000].sum() + 7 * 2_000_000) / 1e9
    measured_wall = (ok_wall[:3000].sum() + 7 * 2_000_000) / 1e9
    assert row.cpu_seconds == pytest.approx(measured_cpu, rel=1e-12)
    assert row.cpu_ratio == pytest.approx(measured_cpu / measured_wall, rel=1e-12)
    # CPU per call counts only the calls whose CPU was read, as a sampled stage needs.
    assert row.cpu_sampled_count == 3007
    assert row.cpu_per_call == pytest.approx(measured_cpu / 3007, rel=1e-12)
    assert row.to_dict()["cpu_sampled_count"] == 3007
    stage = snap.row("fraud", "preprocess")
    assert (stage.cpu_sampled_count, stage.cpu_per_call) == (0, None)
    assert (stage.count, stage.errors, stage.cpu_seconds, stage.cpu_ratio, dict(stage.error_types)) == (
        10,
        0,
        None,
        None,
        {},
    )
    assert snap.row("fraud", "infer/encoder").count == 4
    overflow = snap.row(None)
    assert (overflow.overflow, overflow.count) == (True, 5)
    assert snap.keys_overflowed == 1
    assert snap.dropped == {DROP_RING_FULL: 11}
    assert snap.backend == "python"

    table = snap.table()
    for name in ("fraud", "alpha", "infer/encoder", "warmup", "overflow", "p95", "cpu/wall"):
        assert name in table
    lines = table.splitlines()
    # Aligned: every row's count ends in the column where the header's "count" ends.
    count_end = lines[0].index("count") + len("count")
    for line, row in zip(lines[1 : 1 + len(snap.rows)], snap.rows, strict=True):
        assert line[:count_end].endswith(f" {row.count}"), line
        assert line[count_end] == " "
    assert "dropped" in table and "11" in table

    encoded = json.dumps(snap.to_dict(), allow_nan=False)
    decoded = json.loads(encoded)
    assert decoded["backend"] == "python"
    assert decoded["rows"][1]["model"] == "fraud"
    assert decoded["rows"][1]["count"] == 5010


def test_row_lookup_errors_are_helpful() -> None:
    registry = KeyRegistry()
    v1, v2 = registry.inference_key("m", "1"), registry.inference_key("m", "2")
    aggregator = Aggregator(registry)
    aggregator.add(_records_for(v1, [1_000_000]))
    aggregator.add(_records_for(v2, [2_000_000] * 2))
    snap = build_snapshot(aggregator.view(), "c")
    with pytest.raises(KeyError, match=r"no snapshot row for model='nope'.*'m'"):
        snap.row("nope")
    with pytest.raises(KeyError, match="pass version="):
        snap.row("m")
    assert snap.row("m", version="2").count == 2
    empty = build_snapshot(Aggregator(registry).view(), "c")
    with pytest.raises(KeyError, match="nothing has been recorded"):
        empty.row("m")
    assert "model" in empty.table()
    assert json.dumps(empty.to_dict(), allow_nan=False)


def test_keys_differing_only_in_attributes_share_a_row() -> None:
    registry = KeyRegistry()
    east = registry.inference_key("m", attributes={"region": "east"})
    west = registry.inference_key("m", attributes={"region": "west"})
    aggregator = Aggregator(registry)
    aggregator.add(_records_for(east, [1_000_000] * 3))
    aggregator.add(_records_for(west, [1_000_000] * 4))
    snap = build_snapshot(aggregator.view(), "c")
    assert [(r.model, r.count) for r in snap.rows] == [("m", 7)]


def test_abandoned_counts_reach_the_row(registry: KeyRegistry) -> None:
    key = registry.inference_key("gen")
    records = _records_for(key, [1_000] * 6)
    records["flags"][:4] = FLAG_ABANDONED
    aggregator = Aggregator(registry)
    aggregator.add(records)
    assert build_snapshot(aggregator.view(), "c").row("gen").abandoned == 4


def test_the_former_aggregate_module_names_the_same_objects_as_their_new_modules() -> None:
    former = importlib.import_module("inferscope.aggregate")
    homes = [
        importlib.import_module(f"inferscope.{name}") for name in ("histogram", "aggregator", "snapshots")
    ]
    for name in former.__all__:
        owners = [home for home in homes if name in home.__all__]
        assert len(owners) == 1, name
        assert getattr(former, name) is getattr(owners[0], name), name
