"""The fold of drained records into histograms: numpy against C, and what each leaves to other threads.

    python3 benchmarks/drain.py            # ~25 s
    python3 benchmarks/drain.py --quick    # ~8 s
    python3 benchmarks/drain.py --json drain.json

Needs the C extension (it says so and exits 0 without it).

Part 1, records per second: 1,048,576 pre-filled records over 10 keys, with the ``minimal``
counter set (cpu_ns -1, counters 0) and with the ``default`` one (cpu_ns measured, the context
switch and page fault counters set), folded in the drainer's batches of 16,384 records:
- (a) the numpy fold (``aggregator._fold_batch``: the pure-Python backend's path, and the C
  backend's before the fold moved to C);
- (b) the C fold alone (``fold_records``, the GIL released);
- (c) ``Aggregator.add`` end to end with the C fold (the fold, the arrays around its bytes, and
  the merge into the series under the lock); ``Aggregator.add`` with the numpy fold beside it;
- (d) a plain C loop over the same memory: numpy's int64 sum over the 136 bytes of each record that
  the fold reads (key to the last counter), in one pass: reading the batch with no work per record.
Medians over the repeats, the cases interleaved; ratios (b)/(a), (c)/(b), the two ``add`` end to
end, and (b)/(d).

Part 2, what the GIL leaves to other threads: a Python thread counts in a loop, first alone and then
while the main thread aggregates a stream of 4,096-record batches (``default`` counters) for
``--seconds``, with the numpy fold and with the C fold; its rate is printed relative to its rate
alone (the mean of one run just before and one just after), and as the counter's time lost per million
records aggregated (the C fold gets through more records in the same time). With the default
switch interval (5 ms) and with the drainer's (0.5 ms, ``_pipeline._DRAIN_SWITCH_INTERVAL_S``).

Part 3, the native drainer from a pre-filled ring (``_native.Collector``, collector.h): the default
pipeline with a 524,288-slot ring, its drainer stopped, is filled by 262,144 calls of a tracked
function with one stage (524,288 real records of the counter set), outside the timed region. Timed:
- (e) ``Collector.collect()``: the ring drained and folded into histograms, the GIL released;
- (f) ``Drainer.drain()``: the same, and the merge into the aggregator, end to end;
- (g) the plain C fold of the same number of records from an array (``fold_records`` in one call,
  the records drained from a ring filled the same way beforehand): the floor (e) is held to.
Records/s, medians over the repeats, the cases interleaved; the ratio (e)/(g) (target >= 1/1.5).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import _common
import numpy as np

import inferscope
from inferscope._keys import KeyRegistry
from inferscope._pipeline import _DRAIN_BATCH, _DRAIN_SWITCH_INTERVAL_S
from inferscope._records import (
    RECORD_DTYPE,
    SLOT_INVOLUNTARY_SWITCHES,
    SLOT_MAJOR_FAULTS,
    SLOT_MINOR_FAULTS,
    SLOT_VOLUNTARY_SWITCHES,
    empty_records,
)
from inferscope.aggregator import Aggregator, _fold_batch
from inferscope.histogram import SCALE, _Scratch, _sub_bucket_tables

RECORDS = 1 << 20
KEYS = 10
STREAM_BATCH = 4096
COUNTER_SETS = ("minimal", "default")


def make_records(counters: str, registry: KeyRegistry) -> np.ndarray:
    """Durations log-normal around 2 ms; with ``default``, CPU a fraction of them and a few context
    switches and page faults per call, as counters="default" records them."""
    rng = np.random.default_rng(20261206)
    keys = np.array([registry.inference_key(f"bench.drain.{i}") for i in range(KEYS)], np.uint32)
    records = empty_records(RECORDS)
    records["key"] = rng.choice(keys, RECORDS)
    wall = np.maximum(rng.lognormal(np.log(2e6), 1.0, RECORDS), 1_000).astype(np.int64)
    records["wall_ns"] = wall
    records["start_ns"] = np.cumsum(wall)
    if counters == "minimal":
        records["cpu_ns"] = -1
    else:
        records["cpu_ns"] = (wall * rng.uniform(0.2, 1.0, RECORDS)).astype(np.int64)
        records["counters"][:, SLOT_VOLUNTARY_SWITCHES] = rng.poisson(0.5, RECORDS)
        records["counters"][:, SLOT_INVOLUNTARY_SWITCHES] = rng.poisson(0.2, RECORDS)
        records["counters"][:, SLOT_MINOR_FAULTS] = rng.poisson(3.0, RECORDS)
        records["counters"][:, SLOT_MAJOR_FAULTS] = rng.poisson(0.001, RECORDS)
    return records


def batches_of(records: np.ndarray, size: int) -> list[np.ndarray]:
    return [records[i : i + size] for i in range(0, records.size, size)]


def read_bytes(batch: np.ndarray) -> np.ndarray:
    """The bytes of each record that the fold reads (key to the last counter, 136 of its 176) as a
    (records, 17) int64 view: a reduction over it is one plain C loop that reads what the fold reads."""
    words = batch.view(np.int64).reshape(batch.size, RECORD_DTYPE.itemsize // 8)
    return words[:, : RECORD_DTYPE.fields["trace_hi"][1] // 8]


class FoldCases:
    """The five ways to fold one record set (see the module docstring), each a callable that folds
    all of its records in the drainer's batches."""

    def __init__(self, counters: str) -> None:
        from inferscope._native import fold_records

        self.counters = counters
        registry = KeyRegistry()
        batches = batches_of(make_records(counters, registry), _DRAIN_BATCH)
        below, next_start = _sub_bucket_tables(SCALE)
        scratch = _Scratch()
        self.by_numpy = Aggregator(registry, native_fold=False)
        self.by_c = Aggregator(registry, native_fold=True)

        def numpy_fold() -> None:
            for batch in batches:
                _fold_batch(batch, scratch)

        def c_fold() -> None:
            for batch in batches:
                fold_records(batch, SCALE, below, next_start)

        def add_with_c() -> None:
            for batch in batches:
                self.by_c.add(batch)

        def add_with_numpy() -> None:
            for batch in batches:
                self.by_numpy.add(batch)

        def plain_loop() -> None:
            for batch in batches:
                read_bytes(batch).sum()

        self.cases: dict[str, Callable[[], None]] = {
            "numpy fold": numpy_fold,
            "C fold": c_fold,
            "add, C fold": add_with_c,
            "add, numpy fold": add_with_numpy,
            "plain C loop": plain_loop,
        }

    def check(self) -> None:
        """Both aggregators were fed the same batches as often: they must hold the same series."""

        def figures(aggregator: Aggregator) -> list[Any]:
            return [
                (s.info.key, s.duration, s.cpu, s.cpu_wall_seconds, s.counters.tolist())
                for s in aggregator.view().series
            ]

        if figures(self.by_c) != figures(self.by_numpy):
            raise RuntimeError("the C fold and the numpy fold aggregated different series")


def fold_rates(repeats: int) -> list[dict[str, Any]]:
    """Records/s of every case of every counter set, the cases interleaved (one run of each per
    repeat) so that a change in the machine's load touches them all alike; medians."""
    sets = [FoldCases(counters) for counters in COUNTER_SETS]
    samples = {s.counters: {name: [] for name in s.cases} for s in sets}
    for s in sets:
        for work in s.cases.values():
            work()  # warm up: scratch arrays, series, page faults
    for repeat in range(repeats):
        _common.progress(f"drain.py: the folds, repeat {repeat + 1} of {repeats}")
        for s in sets:
            for name, work in s.cases.items():
                t0 = time.perf_counter()
                work()
                samples[s.counters][name].append(RECORDS / (time.perf_counter() - t0))
    for s in sets:
        s.check()
    return [
        {
            "counters": counters,
            "records_per_second": {name: _common.median(values) for name, values in by_case.items()},
            "samples_records_per_second": by_case,
        }
        for counters, by_case in samples.items()
    ]


def counting_rate(seconds: float, main_work: Callable[[], None] | None) -> tuple[float, float]:
    """Iterations/s of a counting Python thread over ``seconds``, and the calls/s of ``main_work``
    run meanwhile in a loop by the main thread (``None``: the main thread sleeps)."""
    stop = threading.Event()
    count = [0, 0.0]

    def counter() -> None:
        n = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            for _ in range(1000):
                n += 1
        count[0], count[1] = n, time.perf_counter() - t0

    thread = threading.Thread(target=counter, name="bench-counter")
    thread.start()
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    if main_work is None:
        time.sleep(seconds)
    else:
        while time.perf_counter() < deadline:
            main_work()
            calls += 1
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    return count[0] / count[1], calls / elapsed


def gil_share(seconds: float) -> list[dict[str, Any]]:
    registry = KeyRegistry()
    batch = make_records("default", registry)[:STREAM_BATCH].copy()
    rows = []
    previous = sys.getswitchinterval()
    try:
        for interval in (previous, _DRAIN_SWITCH_INTERVAL_S):
            sys.setswitchinterval(interval)
            for path, native in (("numpy fold", False), ("C fold", True)):
                aggregator = Aggregator(registry, native_fold=native)
                aggregator.add(batch)
                _common.progress(
                    f"drain.py: a counting thread beside Aggregator.add ({path}), switch interval "
                    f"{interval * 1e3:g} ms"
                )
                alone_before, _ = counting_rate(seconds / 2, None)
                beside, adds = counting_rate(seconds, lambda a=aggregator: a.add(batch))
                alone_after, _ = counting_rate(seconds / 2, None)
                alone = (alone_before + alone_after) / 2
                rows.append(
                    {
                        "switch_interval_s": interval,
                        "path": path,
                        "counter_alone_per_second": alone,
                        "counter_beside_per_second": beside,
                        "counter_share": beside / alone,
                        "aggregated_records_per_second": adds * STREAM_BATCH,
                        # The main thread aggregates as fast as it can, and the C fold gets through
                        # more records: the counter's loss per record aggregated compares the two.
                        "counter_loss_per_million_records": (1 - beside / alone)
                        / (adds * STREAM_BATCH / 1e6),
                    }
                )
    finally:
        sys.setswitchinterval(previous)
    return rows


NATIVE_RING = 1 << 19
NATIVE_CALLS = NATIVE_RING // 2  # a tracked call with one stage: two records


def native_drain_rates(repeats: int) -> list[dict[str, Any]]:
    from inferscope import _pipeline
    from inferscope._native import fold_records

    below, next_start = _sub_bucket_tables(SCALE)
    rows = []
    for counters in COUNTER_SETS:
        inferscope.configure(
            counters=counters, ring_capacity=NATIVE_RING, metrics_exporters="none", recorder="off"
        )
        _pipeline.DRAINER.stop()  # nothing drains but the timed calls

        @inferscope.track_inference(model=f"bench.drain.native.{counters}")
        def call() -> None:
            with inferscope.stage("step"):
                pass

        def fill() -> None:
            for _ in range(NATIVE_CALLS):
                call()
            if len(_pipeline.RUNTIME.ring) != 2 * NATIVE_CALLS:
                raise RuntimeError(f"the ring holds {len(_pipeline.RUNTIME.ring)} records")

        collector = _pipeline.DRAINER._native_collector()
        samples: dict[str, list[float]] = {"collect": [], "drain": [], "fold": []}
        for repeat in range(repeats + 1):  # the first is a warm-up
            _common.progress(f"drain.py: the native drainer, counters={counters}, repeat {repeat}/{repeats}")
            fill()
            t0 = time.perf_counter()
            collector.collect()
            collect = time.perf_counter() - t0
            fill()
            t0 = time.perf_counter()
            _pipeline.DRAINER.drain()
            drain = time.perf_counter() - t0
            fill()
            records = empty_records(2 * NATIVE_CALLS)
            _pipeline.RUNTIME.ring.drain(records)
            t0 = time.perf_counter()
            fold_records(records, SCALE, below, next_start)
            fold = time.perf_counter() - t0
            if repeat:
                for name, seconds in (("collect", collect), ("drain", drain), ("fold", fold)):
                    samples[name].append(2 * NATIVE_CALLS / seconds)
        rows.append(
            {
                "counters": counters,
                "records_per_second": {name: _common.median(v) for name, v in samples.items()},
                "samples_records_per_second": samples,
            }
        )
    inferscope.configure()
    return rows


def report(data: dict[str, Any]) -> str:
    rate_rows, ratio_rows = [], []
    for case in data["folds"]:
        r = case["records_per_second"]
        rate_rows.append(
            (
                case["counters"],
                _common.rate(r["numpy fold"]),
                _common.rate(r["C fold"]),
                _common.rate(r["add, C fold"]),
                _common.rate(r["add, numpy fold"]),
                _common.rate(r["plain C loop"]),
            )
        )
        ratio_rows.append(
            (
                case["counters"],
                f"{r['C fold'] / r['numpy fold']:.1f}x",
                f"{r['add, C fold'] / r['C fold']:.2f}",
                f"{r['add, C fold'] / r['add, numpy fold']:.1f}x",
                f"{r['C fold'] / r['plain C loop']:.2f}",
            )
        )
    repeats = len(data["folds"][0]["samples_records_per_second"]["C fold"])
    gil_rows = [
        (
            f"{g['switch_interval_s'] * 1e3:g} ms",
            g["path"],
            f"{g['counter_alone_per_second'] / 1e6:.2f} M/s",
            f"{g['counter_beside_per_second'] / 1e6:.2f} M/s",
            f"{g['counter_share']:.2f}",
            _common.rate(g["aggregated_records_per_second"]),
            f"{g['counter_loss_per_million_records'] * 1e3:.0f} ms",
        )
        for g in data["gil"]
    ]
    lines = [
        "inferscope drain benchmark: the fold of drained records",
        _common.environment_line(data["environment"]),
        "",
        f"Records/s, {RECORDS:,} records over {KEYS} keys in batches of {_DRAIN_BATCH:,}, "
        f"median of {repeats}",
        _common.table(
            (
                "counters",
                "(a) numpy fold",
                "(b) C fold",
                "(c) add, C fold",
                "add, numpy fold",
                "(d) plain C loop",
            ),
            rate_rows,
        ),
        "",
        _common.table(
            ("counters", "(b)/(a)", "(c)/(b)", "add: C / numpy", "(b)/(d)"),
            ratio_rows,
        ),
        "",
        f"A counting Python thread beside Aggregator.add of {STREAM_BATCH:,}-record batches (default "
        "counters), the main thread aggregating as fast as it can: the counter's rate, as a share of "
        "its rate alone (1.00: the aggregation took nothing from it), and the counter's time lost per "
        "million records aggregated (on 2 CPUs, other processes take cores from both threads too)",
        _common.table(
            (
                "switch interval",
                "fold",
                "counter alone",
                "beside add",
                "share",
                "aggregated meanwhile",
                "lost per M records",
            ),
            gil_rows,
            left=2,
        ),
    ]
    native = data.get("native")
    if native:
        native_rows = []
        for case in native:
            r = case["records_per_second"]
            ratio = r["collect"] / r["fold"]
            native_rows.append(
                (
                    case["counters"],
                    _common.rate(r["collect"]),
                    _common.rate(r["drain"]),
                    _common.rate(r["fold"]),
                    f"{ratio:.2f} {_common.verdict(ratio >= 1 / 1.5)}",
                )
            )
        lines += [
            "",
            f"The native drainer from a pre-filled ring of {2 * NATIVE_CALLS:,} real records, median of "
            f"{len(native[0]['samples_records_per_second']['collect'])} (target: (e)/(g) >= 0.67)",
            _common.table(
                ("counters", "(e) collect()", "(f) Drainer.drain()", "(g) plain C fold", "(e)/(g)"),
                native_rows,
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="each contended run (default 2)")
    args = parser.parse_args(argv)
    if inferscope.backend() != "c":
        print(f"drain.py measures the C fold, and the C extension is not in use: {inferscope.BACKEND_REASON}")
        return 0
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
    repeats = 3 if args.quick else 7
    load = _common.MachineLoad()
    data: dict[str, Any] = {"environment": _common.environment()}
    data["folds"] = fold_rates(repeats)
    data["gil"] = gil_share(seconds)
    data["native"] = native_drain_rates(repeats)
    return _common.finish(data, report, load, args.json)


if __name__ == "__main__":
    sys.exit(main())
