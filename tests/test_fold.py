"""The C fold of a drained batch (``fold_records``, ``_native/fold.h``) against the numpy fold.

``Aggregator.add`` folds a batch in C with the GIL released when the C backend is in use, and with
numpy otherwise. The two must give the same bits: the same rows, bucket indices, float sums,
extremes, counts and counter sums, for every batch. The parity tests compare the folds of random
batches field by field, and the views of two aggregators, one per fold, series by series.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from inferscope._keys import KeyRegistry
from inferscope._records import COUNTER_SLOTS, FLAG_ABANDONED, FLAG_TRACED, RECORD_DTYPE, empty_records
from inferscope.aggregator import (
    _ERROR_BITS,
    _MAX_LOOKUP_TABLE,
    AggregateView,
    Aggregator,
    _BatchFold,
    _BatchHistograms,
    _fold_batch,
    _fold_batch_native,
)
from inferscope.histogram import SCALE, Histogram, _Scratch, _sub_bucket_tables

from .conftest import _native, run_python

pytestmark = [
    pytest.mark.c_only,
    pytest.mark.skipif(_native is None, reason="the C extension is not built"),
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def random_records(
    rng: np.random.Generator,
    n: int,
    keys: np.ndarray,
    error_ids: np.ndarray,
    *,
    cpu_share: float = 0.5,
    error_share: float = 0.2,
) -> np.ndarray:
    """Records whose values span every octave a duration can take, with the edge cases mixed in:
    zero and negative walls, cpu_ns -1 (and other negatives), abandoned and traced flags, and
    counters from 0 to the int64 extremes (negative ones are RSS and heap deltas)."""
    records = empty_records(n)
    records["key"] = rng.choice(keys, n)
    failed = rng.random(n) < error_share
    records["error"][failed] = rng.choice(error_ids, int(failed.sum()))
    records["flags"] = np.where(rng.random(n) < 0.1, FLAG_ABANDONED, 0) | np.where(
        rng.random(n) < 0.1, FLAG_TRACED, 0
    )
    # 1 ns to 2**63 - 1 ns, uniform in log space, so that values land in every octave and near
    # bucket boundaries of every octave; then the extremes and the non-positive walls.
    wall = np.exp2(rng.uniform(0, 63, n)).astype(np.float64)
    wall_ns = np.minimum(wall, 2.0**63 - 1024).astype(np.int64)
    special = rng.choice(6, n, p=[0.93, 0.03, 0.02, 0.01, 0.005, 0.005])
    wall_ns[special == 1] = 0
    wall_ns[special == 2] = -rng.integers(1, 10**12, int((special == 2).sum()))  # clock steps
    wall_ns[special == 3] = 1
    wall_ns[special == 4] = INT64_MAX
    wall_ns[special == 5] = INT64_MIN
    records["wall_ns"] = wall_ns
    measured = rng.random(n) < cpu_share
    cpu_ns = np.exp2(rng.uniform(0, 63, n)).astype(np.float64)
    cpu_ns = np.minimum(cpu_ns, 2.0**63 - 1024).astype(np.int64)
    cpu_ns[rng.random(n) < 0.05] = 0
    cpu_ns[rng.random(n) < 0.01] = INT64_MAX
    cpu_ns = np.where(measured, cpu_ns, -1)
    cpu_ns[~measured & (rng.random(n) < 0.1)] = -7  # any negative means "not measured"
    records["cpu_ns"] = cpu_ns
    counters = rng.integers(0, 1000, (n, COUNTER_SLOTS))
    counters[:, 8] = rng.integers(-(2**40), 2**40, n)  # RSS deltas, either sign
    counters[:, 10] = rng.integers(-(2**30), 2**30, n)  # Python heap deltas
    counters[rng.random(n) < 0.3] = 0
    big = rng.random(n) < 0.01  # sums that wrap around int64, as numpy's int64 sums do
    counters[big, 4] = rng.choice([INT64_MAX, INT64_MIN, 2**62, -(2**62)], int(big.sum()))
    records["counters"] = counters
    records["start_ns"] = np.arange(n)
    records["trace_hi"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    return records


def assert_same_histograms(numpy_side: _BatchHistograms, native: _BatchHistograms) -> None:
    for name, a, b in zip(_BatchHistograms._fields, numpy_side, native, strict=True):
        assert a.dtype == b.dtype, name
        # array_equal compares floats exactly (inf == inf); no NaN can occur.
        assert np.array_equal(a, b), f"{name}: numpy {a[:10]}... native {b[:10]}..."


def assert_same_fold(numpy_side: _BatchFold, native: _BatchFold) -> None:
    assert np.array_equal(numpy_side.series_ids, native.series_ids)
    assert_same_histograms(numpy_side.duration, native.duration)
    assert (numpy_side.cpu is None) == (native.cpu is None)
    if numpy_side.cpu is not None and native.cpu is not None:
        assert_same_histograms(numpy_side.cpu, native.cpu)
    for name in ("cpu_wall", "abandoned", "counter_sums"):
        a, b = getattr(numpy_side, name), getattr(native, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(a, b), name


def assert_same_histogram(a: Histogram, b: Histogram) -> None:
    """Bucket by bucket, and every float exactly."""
    assert (a.scale, a.zero_count, a.count) == (b.scale, b.zero_count, b.count)
    assert a.sum == b.sum and a.min == b.min and a.max == b.max
    assert a._trimmed()[0] == b._trimmed()[0]
    assert a._trimmed()[1].tolist() == b._trimmed()[1].tolist()


def assert_same_view(a: AggregateView, b: AggregateView) -> None:
    assert len(a.series) == len(b.series)
    for sa, sb in zip(a.series, b.series, strict=True):
        assert (sa.info, sa.error_id, sa.error_type) == (sb.info, sb.error_id, sb.error_type)
        assert_same_histogram(sa.duration, sb.duration)
        assert (sa.cpu is None) == (sb.cpu is None)
        if sa.cpu is not None and sb.cpu is not None:
            assert_same_histogram(sa.cpu, sb.cpu)
        assert sa.cpu_wall_seconds == sb.cpu_wall_seconds
        assert sa.abandoned == sb.abandoned
        assert sa.counters.tolist() == sb.counters.tolist()
        assert sa.gpu is None and sb.gpu is None


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cpu_share", [0.0, 0.5, 1.0])
def test_native_fold_equals_numpy_fold_bit_for_bit(seed: int, cpu_share: float) -> None:
    rng = np.random.default_rng(seed)
    keys = np.array([0, 1, 2, 3, 17, 1000, 65_535, 2**20 + 3, 2**31, 2**32 - 1], dtype=np.uint32)
    errors = np.array([1, 2, 3, 9, 2**16 - 1], dtype=np.uint16)
    records = random_records(rng, 5000, keys, errors, cpu_share=cpu_share)
    assert_same_fold(_fold_batch(records, _Scratch()), _fold_batch_native(records))


def test_native_fold_equals_numpy_fold_on_both_ways_of_numbering_rows() -> None:
    """The numpy fold numbers rows with a lookup table over the (key, error) space when it is small
    and with a sort when it is not; the C fold must give the same rows either way."""
    rng = np.random.default_rng(42)
    small = np.arange(50, dtype=np.uint32)
    records = random_records(rng, 3000, small, np.array([1, 2], np.uint16))
    assert (int(small.max()) + 1) * 3 <= _MAX_LOOKUP_TABLE  # the table
    assert_same_fold(_fold_batch(records, _Scratch()), _fold_batch_native(records))
    spread = rng.integers(0, 2**32, 4000, dtype=np.uint32)
    records = random_records(rng, 3000, spread, np.arange(1, 300, dtype=np.uint16))
    assert int(spread.max()) * 2 > max(_MAX_LOOKUP_TABLE, 4 * records.size)  # the sort
    fold = _fold_batch_native(records)
    assert_same_fold(_fold_batch(records, _Scratch()), fold)
    assert fold.series_ids.size > 2000
    assert np.all(np.diff(fold.series_ids) > 0)


@pytest.mark.parametrize(
    "wall_ns",
    [
        [1, 2, 3, 999_999_999, 1_000_000_000, 1_000_000_001, 2_000_000_000],  # around 1 s, 2 s
        [0, 0, 0],  # zeros only: no buckets at all
        [-1, -(2**62), INT64_MIN],  # clock steps only: zeros too
        [INT64_MAX, INT64_MAX - 1, 2**62, 2**62 + 1],
        [5],
    ],
)
def test_native_fold_of_edge_values(wall_ns: list[int]) -> None:
    records = empty_records(len(wall_ns))
    records["wall_ns"] = wall_ns
    records["cpu_ns"] = wall_ns  # negative ones are "not measured"
    assert_same_fold(_fold_batch(records, _Scratch()), _fold_batch_native(records))


def test_native_fold_of_values_at_every_bucket_boundary() -> None:
    """Durations of n ns for the n nearest to every bucket boundary between 1 ns and 2**40 ns:
    the floats closest to the (irrational) boundaries, where an inexact index would be off by one."""
    boundaries = np.exp2(np.arange(-30 * 2**SCALE, 10 * 2**SCALE) / 2**SCALE) * 1e9
    nearest = np.unique(np.round(boundaries).astype(np.int64)[:, None] + np.arange(-2, 3)[None, :])
    records = empty_records(nearest.size)
    records["wall_ns"] = nearest
    records["cpu_ns"] = nearest
    assert_same_fold(_fold_batch(records, _Scratch()), _fold_batch_native(records))


def test_native_fold_of_an_empty_batch() -> None:
    fold = _fold_batch_native(empty_records(0))
    assert fold.series_ids.size == 0
    assert fold.duration.buckets.size == 0 and fold.duration.value_count.size == 0
    assert fold.cpu is None and fold.cpu_wall is None
    assert fold.abandoned is None and fold.counter_sums is None


def test_native_fold_reads_a_slice_of_the_drainers_buffer() -> None:
    """The drainer folds ``buffer[:n]``; a strided or misaligned array is copied first, not misread."""
    records = random_records(
        np.random.default_rng(5), 1000, np.arange(5, dtype=np.uint32), np.array([1], np.uint16)
    )
    assert_same_fold(_fold_batch(records[:700], _Scratch()), _fold_batch_native(records[:700]))
    strided = records[::3]
    assert_same_fold(_fold_batch(strided, _Scratch()), _fold_batch_native(strided))
    misaligned = np.frombuffer(bytearray(records.nbytes + 1), RECORD_DTYPE, count=records.size, offset=1)
    misaligned[:] = records
    assert_same_fold(_fold_batch(records, _Scratch()), _fold_batch_native(misaligned))


def registered(registry: KeyRegistry, count: int, errors: int) -> tuple[np.ndarray, np.ndarray]:
    fraud = registry.inference_key("fraud", "3")
    keys = [fraud, registry.stage_key(fraud, "infer")]
    keys += [registry.inference_key(f"m{i}") for i in range(count - 2)]
    error_ids = [registry.error_id(type(f"E{i}", (Exception,), {})) for i in range(errors)]
    return np.array(keys, np.uint32), np.array(error_ids, np.uint16)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("key_count", "error_count"), [(10, 3), (6000, 200)])
def test_aggregators_with_either_fold_hold_the_same_series(
    seed: int, key_count: int, error_count: int
) -> None:
    """Several batches into two aggregators, one per fold: every field of every series is equal.
    6000 keys and 200 error types make the numpy fold number its rows by sorting."""
    registry = KeyRegistry(max_keys=10_000)
    keys, error_ids = registered(registry, key_count, error_count)
    rng = np.random.default_rng(seed)
    by_numpy = Aggregator(registry, native_fold=False)
    by_c = Aggregator(registry, native_fold=True)
    batches = [
        random_records(rng, 4000, keys, error_ids, cpu_share=0.5),
        random_records(rng, 1, keys, error_ids, cpu_share=1.0),
        random_records(rng, 2500, keys, error_ids, cpu_share=0.0),
        random_records(rng, 3000, keys, error_ids, cpu_share=1.0),
        empty_records(0),
    ]
    for batch in batches:
        by_numpy.add(batch)
        by_c.add(batch)
        assert_same_view(by_numpy.view(), by_c.view())
    assert len(by_c.view().series) > min(key_count, 10)


def test_aggregator_uses_the_native_fold_on_the_c_backend() -> None:
    import inferscope

    assert Aggregator(KeyRegistry())._native_fold == (inferscope.backend() == "c")


# ---------------------------------------------------------------------------------------------------
# Bad input is refused with an error that says what was expected.


def fold(records: object, scale: int = SCALE, below: object = None, next_start: object = None) -> object:
    tables = _sub_bucket_tables(scale if 1 <= scale <= 10 else SCALE)
    assert _native is not None
    return _native.fold_records(
        records, scale, tables[0] if below is None else below, tables[1] if next_start is None else next_start
    )


@pytest.mark.parametrize(
    "records",
    [
        b"\0" * RECORD_DTYPE.itemsize * 4,  # bytes: 1-byte items
        np.zeros(22 * 4, np.float64),  # 8-byte items
        np.zeros((2, 2), RECORD_DTYPE),  # 2 dimensions
        np.zeros(4, np.dtype([("key", "<u4"), ("pad", "V172"), ("more", "<u8")])),  # 184-byte items
    ],
    ids=["bytes", "float64", "2-d", "184-byte records"],
)
def test_fold_records_refuses_buffers_that_are_not_records(records: object) -> None:
    with pytest.raises(TypeError, match=r"RECORD_DTYPE \(176-byte records\)"):
        fold(records)


def test_fold_records_refuses_misaligned_and_non_contiguous_records() -> None:
    raw = bytearray(RECORD_DTYPE.itemsize * 3 + 1)
    misaligned = np.frombuffer(raw, RECORD_DTYPE, count=3, offset=1)
    with pytest.raises(ValueError, match="8-byte aligned"):
        fold(misaligned)
    with pytest.raises((ValueError, BufferError), match="contiguous"):
        fold(np.zeros(6, RECORD_DTYPE)[::2])
    with pytest.raises(TypeError, match="bytes-like object"):
        fold(object())


def test_fold_batch_native_refuses_another_dtype_of_the_same_size() -> None:
    other = np.zeros(3, np.dtype([("raw", "V176")]))
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        _fold_batch_native(other)


@pytest.mark.parametrize("scale", [0, -1, 11, 2**40])
def test_fold_records_refuses_scales_without_tables(scale: int) -> None:
    with pytest.raises((ValueError, OverflowError), match=r"scale|too large|int"):
        fold(empty_records(2), scale)


def test_fold_records_refuses_tables_of_the_wrong_shape_or_values() -> None:
    below, next_start = _sub_bucket_tables(SCALE)
    with pytest.raises(TypeError, match=r"below must be a 1-D int64 buffer of 4096 cells"):
        fold(empty_records(2), below=below.astype(np.float64))
    with pytest.raises(TypeError, match=r"next_start must be a 1-D int64 buffer of 4096 cells"):
        fold(empty_records(2), next_start=next_start[:100])
    with pytest.raises(TypeError, match=r"below must be a 1-D int64 buffer"):
        fold(empty_records(2), below=below.astype(np.int32))
    too_big = below.copy()
    too_big[7] = 65
    with pytest.raises(ValueError, match=r"below\[7\] is 65, outside \[0, 64\]"):
        fold(empty_records(2), below=too_big)
    negative = next_start.copy()
    negative[0] = -1
    with pytest.raises(ValueError, match=r"next_start\[0\] is -1"):
        fold(empty_records(2), next_start=negative)


def test_fold_records_with_scrambled_tables_raises_or_folds_but_never_crashes() -> None:
    """Tables within their bounds but not monotone may put a value outside its row's range: the fold
    must notice (ValueError), never write outside its buckets. In a subprocess: a crash fails the
    test instead of killing pytest."""
    result = run_python(
        """
        import numpy as np
        from inferscope._native import fold_records
        from inferscope._records import empty_records
        from inferscope.histogram import _sub_bucket_tables

        rng = np.random.default_rng(3)
        records = empty_records(20000)
        records["key"] = rng.integers(0, 5, records.size)
        records["wall_ns"] = np.exp2(rng.uniform(0, 40, records.size)).astype(np.int64)
        records["cpu_ns"] = records["wall_ns"]
        below, next_start = _sub_bucket_tables(6)
        outcomes = set()
        for trial in range(30):
            b = rng.permutation(below) if trial % 2 else rng.integers(0, 65, below.size)
            s = rng.permutation(next_start) if trial % 3 else rng.integers(0, 2**52, below.size)
            try:
                fold_records(records, 6, np.ascontiguousarray(b, np.int64), np.ascontiguousarray(s, np.int64))
                outcomes.add("folded")
            except ValueError as exc:
                assert "not histogram._sub_bucket_tables" in str(exc), exc
                outcomes.add("ValueError")
        print(sorted(outcomes))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ValueError" in result.stdout


# ---------------------------------------------------------------------------------------------------
# The GIL


def test_fold_records_releases_the_gil() -> None:
    """A thread counts in a loop while the main thread folds 2 M records in C. The switch interval
    is made so long that the main thread never loses the GIL unless it gives it up, so the count
    moves during the fold only because fold_records released the GIL. The same harness around a C
    call that keeps the GIL (a sum over a range) shows that it would see a fold that kept it.
    In a subprocess: it changes the switch interval."""
    result = run_python(
        """
        import sys, threading, time
        import numpy as np
        from inferscope._native import fold_records
        from inferscope._records import empty_records
        from inferscope.histogram import _sub_bucket_tables

        records = empty_records(2_000_000)
        records["key"] = np.arange(records.size) % 10
        records["wall_ns"] = np.arange(records.size) * 997 + 1
        records["cpu_ns"] = records["wall_ns"] // 2
        below, next_start = _sub_bucket_tables(6)

        count = 0
        stop = False
        running = threading.Event()

        def counter():
            global count
            running.set()
            while not stop:
                count += 1
                time.sleep(0.0001)  # gives the GIL back, so that the main thread gets it between calls

        sys.setswitchinterval(1000.0)  # no forced switches: only a release lets the counter run
        thread = threading.Thread(target=counter)
        thread.start()
        running.wait()
        time.sleep(0.01)
        before = count
        sum(range(10_000_000))  # C code that keeps the GIL, ~0.1 s
        kept = count - before
        before = count
        fold_records(records, 6, below, next_start)
        released = count - before
        stop = True
        thread.join()
        print(kept, released)
        """,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    kept, released = map(int, result.stdout.split())
    assert kept == 0, "the harness saw the counter move while the GIL was held"
    assert released > 0, "the counting thread never ran during the fold: the GIL was held"


def test_series_id_packing_matches_the_aggregator() -> None:
    records = empty_records(2)
    records["key"] = [2**32 - 1, 7]
    records["error"] = [2**16 - 1, 0]
    fold = _fold_batch_native(records)
    assert fold.series_ids.tolist() == [7 << _ERROR_BITS, ((2**32 - 1) << _ERROR_BITS) | (2**16 - 1)]
    assert math.isinf(fold.duration.min_positive[0])
